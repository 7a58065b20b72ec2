"""Tests for litovis.processing.chat: Qwen3 rendering, image placeholders and label rules."""

from __future__ import annotations

import pytest

from litovis.model.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID
from litovis.processing.chat import (
    ConversationError,
    render_chat,
    tokenize_chat,
    tokenize_with_images,
)

SINGLE = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Blue."},
]
REASONING = "<think>\nTwo plus two.\n</think>\n\nFour."


def trained_runs(tokenizer, labels: list[int]) -> list[str]:
    """Decode each maximal run of trained label positions."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


# ---------------------------------------------------------------- rendering


def test_single_turn_rendering():
    assert render_chat(SINGLE) == (
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>"
    )


def test_multi_turn_with_system_rendering():
    assert render_chat(MULTI) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nRed.<|im_end|>\n"
        "<|im_start|>user\nAnother one?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>"
    )


def test_generation_prompt_with_and_without_thinking():
    prompt = [{"role": "user", "content": "<image>\nWhat is shown?"}]
    assert render_chat(prompt, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert render_chat(prompt, add_generation_prompt=True, enable_thinking=True) == (
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(prompt, add_generation_prompt=True, think_block="omitted") == (
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(prompt) == "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"


def test_omitted_policy_writes_no_empty_think_block():
    assert render_chat(SINGLE, think_block="omitted") == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"
    )


def test_answer_with_reasoning_gets_no_extra_block():
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": REASONING}]
    for policy in ("masked", "trained", "omitted"):
        assert render_chat(messages, think_block=policy) == (
            f"<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n{REASONING}<|im_end|>"
        )


# ---------------------------------------------------------------- tokenization and labels


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("masked", ["Red.<|im_end|>", "Blue.<|im_end|>"]),
        ("trained", ["<think>\n\n</think>\n\nRed.<|im_end|>", "<think>\n\n</think>\n\nBlue.<|im_end|>"]),
        ("omitted", ["Red.<|im_end|>", "Blue.<|im_end|>"]),
    ],
)
def test_labels_keep_exactly_the_assistant_answers(tiny_tokenizer, policy, expected):
    chat = tokenize_chat(MULTI, tiny_tokenizer, think_block=policy)
    assert len(chat.input_ids) == len(chat.labels)
    assert trained_runs(tiny_tokenizer, chat.labels) == expected
    trained = [i for i, label in enumerate(chat.labels) if label != IGNORE_INDEX]
    assert all(chat.labels[i] == chat.input_ids[i] for i in trained)
    assert chat.labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("policy", ["masked", "trained", "omitted"])
def test_reasoning_answer_is_trained_from_its_start(tiny_tokenizer, policy):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": REASONING}]
    chat = tokenize_chat(messages, tiny_tokenizer, think_block=policy)
    assert trained_runs(tiny_tokenizer, chat.labels) == [REASONING + "<|im_end|>"]


def test_ids_decode_to_the_rendered_text(tiny_tokenizer):
    for policy in ("masked", "trained", "omitted"):
        chat = tokenize_chat(MULTI, tiny_tokenizer, think_block=policy)
        assert tiny_tokenizer.decode(chat.input_ids) == render_chat(MULTI, think_block=policy)


def test_newline_after_im_end_is_input_but_not_target(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tiny_tokenizer("\n", add_special_tokens=False).input_ids
    chat = tokenize_chat(MULTI, tiny_tokenizer)
    ends = [i for i, token in enumerate(chat.input_ids) if token == im_end]
    assert len(ends) == 5
    for position in ends[:-1]:  # every turn but the last is followed by an untrained newline
        assert chat.input_ids[position + 1 : position + 1 + len(newline)] == newline
        assert chat.labels[position + 1] == IGNORE_INDEX
    assert ends[-1] == len(chat.input_ids) - 1  # after the last assistant turn it is dropped
    assert chat.labels[-1] == im_end


def test_generation_prompt_is_fully_untrained(tiny_tokenizer):
    chat = tokenize_chat(MULTI[:4], tiny_tokenizer, add_generation_prompt=True)
    rendered = tiny_tokenizer.decode(chat.input_ids)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert trained_runs(tiny_tokenizer, chat.labels) == ["Red.<|im_end|>"]


def test_image_markers_become_placeholders_never_text(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "<image>Compare<image> and tell.<image>"},
        {"role": "assistant", "content": "They differ."},
    ]
    chat = tokenize_chat(messages, tiny_tokenizer)
    assert chat.num_images == 3
    assert chat.input_ids.count(IMAGE_TOKEN_ID) == 3
    assert all(chat.labels[i] == IGNORE_INDEX for i, t in enumerate(chat.input_ids) if t == IMAGE_TOKEN_ID)
    text_ids = [t for t in chat.input_ids if t != IMAGE_TOKEN_ID]
    assert "<image>" not in tiny_tokenizer.decode(text_ids)
    # The pieces around each marker are tokenized on their own.
    user_turn = "<|im_start|>user\n<image>Compare<image> and tell.<image><|im_end|>\n"
    expected = tokenize_with_images(user_turn, tiny_tokenizer)
    assert chat.input_ids[: len(expected)] == expected
    piece = tiny_tokenizer("Compare", add_special_tokens=False).input_ids
    first = expected.index(IMAGE_TOKEN_ID)
    assert expected[first + 1 : first + 1 + len(piece)] == piece
    assert expected[first + 1 + len(piece)] == IMAGE_TOKEN_ID


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "empty conversation"),
        ([{"role": "robot", "content": "beep"}], "unknown role 'robot'"),
        ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "?"}], "assistant turn before"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "assistant turn before"),
        ([{"role": "user", "content": "u"}, {"role": "system", "content": "s"}], "only the first turn may be"),
        ([{"role": "system", "content": "s"}], "no user turn"),
        ([{"role": "user", "content": ["list"]}], "content must be a string"),
        ([{"content": "no role"}], "'role' and 'content'"),
    ],
)
def test_invalid_conversations_raise_clear_errors(tiny_tokenizer, messages, message):
    with pytest.raises(ConversationError, match=message):
        tokenize_chat(messages, tiny_tokenizer)


def test_generation_prompt_after_assistant_turn_raises():
    with pytest.raises(ConversationError, match="add_generation_prompt"):
        render_chat(SINGLE, add_generation_prompt=True)


def test_unknown_think_policy_raises():
    with pytest.raises(ValueError, match="think_block"):
        render_chat(SINGLE, think_block="sometimes")  # type: ignore[arg-type]
