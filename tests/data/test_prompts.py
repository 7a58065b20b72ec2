"""Prompt templates: the bundled YAML, rendering for training and inference, clear errors."""

from __future__ import annotations

import pytest

from litovis.data.prompts import PromptError, check_template, load_templates, render_messages
from litovis.data.sample import Sample
from tests.data.tiny_inputs import PROMPTS_YAML

CHALLENGE_FIELDS = {
    "captioning": {}, "vqa": {"question": "Q"}, "summarization": {"text": "T"},
    "text_qa": {"text": "T", "question": "Q"}, "math_reasoning": {"text": "T"},
    "dacon_vqa": {"question": "Q"},
}
IMAGE_TASKS = {"captioning", "vqa", "dacon_vqa"}


@pytest.fixture(scope="module")
def templates():
    return load_templates(PROMPTS_YAML)


def _sample(task, fields, target="answer", **kw):
    images = ["img.jpg"] if task in IMAGE_TASKS else []
    return Sample(id="s1", task=task, fields=dict(fields), images=images, target=target, source="f.parquet:3", **kw)


def test_bundled_yaml_has_every_task_and_comments():
    text = PROMPTS_YAML.read_text()
    assert text.startswith("#")
    templates = load_templates(PROMPTS_YAML)
    assert set(templates) == set(CHALLENGE_FIELDS) | {"text_qa_multi"}
    lines = text.splitlines()
    for key in templates:  # every key has a comment line right above it
        index = lines.index(f"{key}: |-")
        assert lines[index - 1].startswith("# "), key


@pytest.mark.parametrize("task", sorted(CHALLENGE_FIELDS))
def test_training_and_inference_share_the_prefix(templates, task):
    sample = _sample(task, CHALLENGE_FIELDS[task])
    train = render_messages(sample, templates)
    infer = render_messages(sample, templates, include_target=False)
    assert train[:-1] == infer
    assert train[-1] == {"role": "assistant", "content": "answer"}
    content = infer[-1]["content"]
    assert (task in IMAGE_TASKS) == content.startswith("<image>")
    for value in CHALLENGE_FIELDS[task].values():
        assert value in content


def test_task_specific_wording(templates):
    render = lambda task: render_messages(_sample(task, CHALLENGE_FIELDS[task]), templates, False)[0]["content"]  # noqa: E731
    assert "#### " in render("math_reasoning")
    assert "official title" in render("summarization")
    assert "The image shows" in render("captioning") and "mood" in render("captioning")
    assert "shortest phrase from the passage" in render("text_qa")
    assert render("dacon_vqa") == "<image>\nQ"


def test_multi_question_template_is_selected_by_the_sample(templates):
    sample = _sample("text_qa", {"text": "T", "question": "1. A?\n2. B?", "template": "text_qa_multi"}, target=None)
    content = render_messages(sample, templates)[0]["content"]
    assert "one answer per line" in content and "1. A?\n2. B?" in content


def test_chat_samples_pass_through(templates):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "<image>hi"},
                {"role": "assistant", "content": "hello"}]
    sample = Sample(id="c", task="chat", messages=messages, images=["a.png"])
    assert render_messages(sample, templates) == messages
    assert render_messages(sample, templates, include_target=False) == messages[:-1]
    with_ref = Sample(id="c", task="chat", messages=messages[:2], images=["a.png"], target="ref")
    assert render_messages(with_ref, templates)[-1] == {"role": "assistant", "content": "ref"}
    assert render_messages(sample, {}) == messages  # needs no template


def test_errors_name_the_sample(templates):
    with pytest.raises(PromptError, match=r"sample s1 \(f.parquet:3\): no template for 'poetry'"):
        render_messages(_sample("poetry", {}), templates)
    with pytest.raises(PromptError, match=r"sample s1 \(f.parquet:3\).*needs field\(s\) \['question'\]"):
        render_messages(_sample("vqa", {}), templates)
    wrong_images = Sample(id="s2", task="vqa", fields={"question": "q"}, images=[], source="x:1")
    with pytest.raises(PromptError, match=r"sample s2 \(x:1\): 1 <image> marker\(s\) for 0 image\(s\)"):
        render_messages(wrong_images, templates)


def test_message_list_templates_and_literal_braces():
    templates = {"t": [{"role": "system", "content": "Use {{json}}."}, {"role": "user", "content": "{text}"}]}
    out = render_messages(Sample(id="1", task="t", fields={"text": "{x}"}, target=None), templates)
    assert out == [{"role": "system", "content": "Use {json}."}, {"role": "user", "content": "{x}"}]


def test_malformed_templates_are_rejected(tmp_path):
    for bad in ({"role": "bot", "content": "x"}, {"role": "user"}, "no"):
        with pytest.raises(PromptError):
            check_template("t", [bad])
    with pytest.raises(PromptError, match="plain field name"):
        check_template("t", "{a.b}")
    with pytest.raises(PromptError, match="bad template text"):
        check_template("t", "{unclosed")
    path = tmp_path / "p.yaml"
    path.write_text("- just a list\n")
    with pytest.raises(PromptError, match="p.yaml: expected a mapping"):
        load_templates(path)
    path.write_text("vqa: 3\n")
    with pytest.raises(PromptError, match="p.yaml: template 'vqa' must be"):
        load_templates(path)
