"""Turn a decoded generation into the answer that goes into a submission.

`clean_answer` applies a fixed list of small, documented rules, each switchable in
`PostprocessConfig`. The rules are applied until nothing changes any more, which makes
`clean_answer` idempotent by construction: cleaning a cleaned answer returns it unchanged
(every rule except the math answer line only ever shortens the text, and the answer line is
added at most once, so the loop always ends).

The number helpers (`find_numbers`, `normalize_number`) are shared with the math metric, so the
answer line written here is exactly what the metric reads back.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from litovis.processing.chat import THINK_END, THINK_START

# A number as written in word problems: optional minus, digits with optional thousands
# separators, optional decimals. The look-behind keeps "3-4" from reading as "-4" and "v2" or
# the ".3" of "1.5.3" from reading as numbers of their own; units may follow ("20kg").
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# A complete thinking block, an orphan closing tag (its opening tag was in the prompt), and an
# unclosed opening tag (generation stopped while still thinking).
_THINK_BLOCK = re.compile(f"{re.escape(THINK_START)}.*?{re.escape(THINK_END)}", re.DOTALL)
# Chat-template control tokens such as <|im_end|>, <|endoftext|>, <|im_start|>.
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")
_MATH_MARKER = "####"
# Text ending in a dotted abbreviation ("U.S.", "p.m.", "e.g.") keeps its final period.
_ABBREVIATION_END = re.compile(r"(?:\w\.){2,}$")


@dataclass
class PostprocessConfig:
    """Which cleaning rules `clean_answer` applies; all but `trim_trailing_period` are on.

    Attributes:
        strip_whitespace: remove leading and trailing whitespace (the reference run's raw outputs
            kept leading newlines).
        remove_think: remove `<think>…</think>` blocks; also drop everything up to an orphan
            `</think>` (its opening tag was part of the prompt) and everything from an unclosed
            `<think>` to the end (generation stopped while thinking).
        remove_special_tokens: remove chat-template control tokens of the form `<|name|>`
            (`<|im_end|>`, `<|endoftext|>`, ...) that leaked into the decoded text.
        unescape_html: replace HTML character references (`&amp;`, `&#39;`, `&quot;`, ...) by the
            characters they stand for.
        ensure_math_answer_line: for `math_tasks`, when the text has no `####` marker at all,
            append a line `#### N` with N the last number of the text (normalised by
            `normalize_number`); nothing is added when no number is found.
        trim_trailing_period: for `short_answer_tasks`, drop trailing periods (`Paris...` →
            `Paris`) unless the text ends in a dotted abbreviation such as `U.S.` or `p.m.`.
        math_tasks: task names that get the `#### N` rule.
        short_answer_tasks: task names that get the trailing-period rule.
    """

    strip_whitespace: bool = True
    remove_think: bool = True
    remove_special_tokens: bool = True
    unescape_html: bool = True
    ensure_math_answer_line: bool = True
    trim_trailing_period: bool = False
    math_tasks: tuple[str, ...] = ("math_reasoning",)
    short_answer_tasks: tuple[str, ...] = ("vqa", "text_qa", "dacon_vqa")


def find_numbers(text: str) -> list[str]:
    """All numbers of `text` in order, as written (e.g. `"1,234"`, `"-3.5"`)."""
    return _NUMBER.findall(text)


def normalize_number(number: str) -> str:
    """Canonical spelling of a number: no thousands separators, no leading `+`, no leading zeros,
    no trailing decimal zeros, `-0` as `0`.

    `"1,234"` → `"1234"`, `"+5"` → `"5"`, `"5.0"` → `"5"`, `"2.50"` → `"2.5"`,
    `".5"` → `"0.5"`, `"-007"` → `"-7"`, `"5."` → `"5"`. Text that is not a number comes
    back stripped but otherwise unchanged.
    """
    text = number.strip().replace(",", "")
    sign = ""
    if text and text[0] in "+-":
        sign, text = ("-" if text[0] == "-" else ""), text[1:]
    whole, _, fraction = text.partition(".")
    if not (whole + fraction).isascii() or not (whole + fraction).isdigit():
        return number.strip()
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    result = f"{whole}.{fraction}" if fraction else whole
    return "0" if result == "0" else sign + result


def _remove_think(text: str) -> str:
    text = _THINK_BLOCK.sub("", text)
    if THINK_END in text:
        text = text.rsplit(THINK_END, 1)[1]
    if THINK_START in text:
        text = text.split(THINK_START, 1)[0]
    return text


def _ensure_math_answer_line(text: str) -> str:
    if _MATH_MARKER in text:
        return text
    numbers = find_numbers(text)
    if not numbers:
        return text
    answer_line = f"{_MATH_MARKER} {normalize_number(numbers[-1])}"
    return f"{text.rstrip()}\n{answer_line}" if text.strip() else answer_line


def _trim_trailing_period(text: str) -> str:
    if not text.endswith(".") or _ABBREVIATION_END.search(text):
        return text
    return text[:-1]


def _clean_once(text: str, task: str, config: PostprocessConfig) -> str:
    if config.remove_special_tokens:
        text = _SPECIAL_TOKEN.sub("", text)
    if config.unescape_html:
        text = html.unescape(text)
    if config.remove_think:
        text = _remove_think(text)
    if config.strip_whitespace:
        text = text.strip()
    if config.trim_trailing_period and task in config.short_answer_tasks:
        text = _trim_trailing_period(text)
    if config.ensure_math_answer_line and task in config.math_tasks:
        text = _ensure_math_answer_line(text)
    return text


def clean_answer(raw: str, task: str, options: PostprocessConfig | None = None) -> str:
    """The submission answer for a decoded generation `raw` of task `task`.

    Rules run in this order, repeated until the text no longer changes (see
    `PostprocessConfig` for each): special tokens, HTML entities, thinking blocks, surrounding
    whitespace, trailing period (short-answer tasks, off by default), `#### N` line (math).
    Tasks without task rules (e.g. `chat`, `captioning`) get the general rules only.
    """
    config = options or PostprocessConfig()
    text = raw
    # Terminates: a changing pass either shortens the text or adds the math line, which
    # happens at most once because the line's `####` stops the rule from firing again.
    while True:
        cleaned = _clean_once(text, task, config)
        if cleaned == text:
            return cleaned
        text = cleaned
