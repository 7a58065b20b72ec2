"""`clean_answer`: each cleaning rule on its own, the math answer line, number helpers, and idempotence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from litovis.inference.postprocess import (
    PostprocessConfig,
    clean_answer,
    find_numbers,
    normalize_number,
)

ALL_OFF = PostprocessConfig(
    strip_whitespace=False,
    remove_think=False,
    remove_special_tokens=False,
    unescape_html=False,
    ensure_math_answer_line=False,
    trim_trailing_period=False,
)


def only(**rules: bool) -> PostprocessConfig:
    config = PostprocessConfig(**{**ALL_OFF.__dict__, **rules})
    return config


def test_strip_whitespace() -> None:
    assert clean_answer("\n\n  The image shows a cat.\n ", "captioning") == "The image shows a cat."
    assert clean_answer("  a  ", "vqa", ALL_OFF) == "  a  "
    assert clean_answer("  a  ", "vqa", only(strip_whitespace=True)) == "a"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<think>let me see</think>Paris", "Paris"),
        ("A<think>x</think>B<think>\ny\n</think>C", "ABC"),
        # The opening tag was in the prompt: everything up to the orphan closing tag is thinking.
        ("so the answer is Paris</think>\n\nParis", "\n\nParis"),
        # Generation stopped while thinking: the unfinished block is dropped.
        ("Paris<think>but maybe Lyon", "Paris"),
        ("<think>never finished", ""),
        ("no tags at all", "no tags at all"),
    ],
)
def test_remove_think(raw: str, expected: str) -> None:
    assert clean_answer(raw, "vqa", only(remove_think=True)) == expected


def test_remove_special_tokens() -> None:
    config = only(remove_special_tokens=True)
    assert clean_answer("Paris<|im_end|>", "vqa", config) == "Paris"
    assert clean_answer("<|im_start|>Paris<|endoftext|><|im_end|>", "vqa", config) == "Paris"
    # Not a control token: spaces inside, or a lone bar.
    assert clean_answer("a <| b |> c | d", "vqa", config) == "a <| b |> c | d"


def test_unescape_html() -> None:
    config = only(unescape_html=True)
    assert clean_answer("Tom &amp; Jerry&#39;s &quot;show&quot; &lt;3", "vqa", config) == (
        "Tom & Jerry's \"show\" <3"
    )
    # Doubly escaped text is unescaped completely (the rule runs to a fixpoint).
    assert clean_answer("AT&amp;amp;T", "vqa", config) == "AT&T"
    assert clean_answer("R&D and AT&T", "vqa", config) == "R&D and AT&T"


def test_math_answer_line_appended_from_last_number() -> None:
    raw = "She buys 3 boxes of 4 = <<3*4=12>>12 apples.\nThen 12 * 100 = 1,200 cents."
    assert clean_answer(raw, "math_reasoning") == raw + "\n#### 1200"


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        ("The change is -5 degrees.", "#### -5"),
        ("Each costs 2.50 dollars.", "#### 2.5"),
        ("The total is 7.0", "#### 7"),
        ("It weighs 20kg", "#### 20"),
    ],
)
def test_math_answer_line_number_forms(raw: str, line: str) -> None:
    assert clean_answer(raw, "math_reasoning").splitlines()[-1] == line


def test_math_answer_line_never_doubled_or_invented() -> None:
    already = "3 + 4 = 7\n#### 7"
    assert clean_answer(already, "math_reasoning") == already
    # A marker anywhere counts: no second #### line is added.
    marker_inside = "#### 7\nbecause 3 + 4 = 7 and 8"
    assert clean_answer(marker_inside, "math_reasoning") == marker_inside
    assert clean_answer("I do not know.", "math_reasoning") == "I do not know."
    assert clean_answer("", "math_reasoning") == ""
    # Other tasks never get the line.
    assert clean_answer("There are 3 cats.", "captioning") == "There are 3 cats."
    no_line = PostprocessConfig(ensure_math_answer_line=False)
    assert clean_answer("7", "math_reasoning", no_line) == "7"


def test_math_answer_line_after_think_removal() -> None:
    raw = "<think>maybe 99</think>So 6 * 7 = 42.<|im_end|>"
    assert clean_answer(raw, "math_reasoning") == "So 6 * 7 = 42.\n#### 42"


def test_trailing_period_only_when_configured() -> None:
    assert clean_answer("Paris.", "vqa") == "Paris."
    config = PostprocessConfig(trim_trailing_period=True)
    assert clean_answer("Paris.", "vqa", config) == "Paris"
    assert clean_answer("Paris.", "dacon_vqa", config) == "Paris"
    assert clean_answer("Paris...", "text_qa", config) == "Paris"
    # Abbreviations keep their period; long-form tasks are never trimmed.
    assert clean_answer("the U.S.", "vqa", config) == "the U.S."
    assert clean_answer("at 5 p.m.", "text_qa", config) == "at 5 p.m."
    assert clean_answer("The image shows a cat.", "captioning", config) == "The image shows a cat."


def test_find_and_normalize_numbers() -> None:
    text = "3-4 items, v2, -5, 1,234.50 and 1.5.3"
    assert find_numbers(text) == ["3", "4", "-5", "1,234.50", "1.5"]
    assert find_numbers("lists 3,4 and 5") == ["3", "4", "5"]
    cases = {"1,234": "1234", "+5": "5", "5.0": "5", "2.50": "2.5", ".5": "0.5", "-007": "-7",
             "-0.0": "0", "5.": "5", "abc": "abc", "": ""}
    assert {k: normalize_number(k) for k in cases} == cases


IDEMPOTENCE_CASES = [
    "\n<think>a</think> x &amp;amp; <|im_end|> 3,000.",
    "&lt;think&gt; 12 &lt;/think&gt;",
    "&amp;lt;think&amp;gt; 5 then 6",
    "<th<|x|>ink> 4 </think> 8",
    "Paris.. ",
    "#### 4 <think>",
]


@pytest.mark.parametrize("raw", IDEMPOTENCE_CASES)
@pytest.mark.parametrize("task", ["math_reasoning", "vqa", "captioning"])
def test_idempotent_on_tricky_inputs(raw: str, task: str) -> None:
    config = PostprocessConfig(trim_trailing_period=True)
    once = clean_answer(raw, task, config)
    assert clean_answer(once, task, config) == once


_PIECES = st.sampled_from(
    ["<think>", "</think>", "<|im_end|>", "<|", "|>", "&amp;", "&lt;", "&gt;", "&#39;", "&", ";",
     "amp", "####", " ", "\n", ".", ",", "-", "+", "1", "23", "4,567", "0.50", "word", "U.S."]
)
_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=14).map("".join)


@settings(max_examples=300, deadline=None)
@given(raw=_TEXT, task=st.sampled_from(["math_reasoning", "vqa", "summarization"]),
       trim=st.booleans())
def test_idempotent_property(raw: str, task: str, trim: bool) -> None:
    config = PostprocessConfig(trim_trailing_period=trim)
    once = clean_answer(raw, task, config)
    assert clean_answer(once, task, config) == once
    assert "<think>" not in once and "</think>" not in once and "<|im_end|>" not in once
    if task == "math_reasoning" and find_numbers(once):
        assert "####" in once
    assert once.count("####") <= max(1, raw.count("####"))
