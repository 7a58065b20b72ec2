"""Qwen3 chat rendering, tokenization and training labels for Ovis2.5.

A turn renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n`; there is no default system prompt;
the generation prompt is `<|im_start|>assistant\\n`, plus an empty `<think>\\n\\n</think>\\n\\n` block
when thinking is off. `<image>` markers are cut out of the text before tokenization and replaced by
`IMAGE_TOKEN_ID` (-200), so the tokenizer never sees them.

Labels (unshifted; -100 = no loss) follow the official Ovis2.5 trainer (`Qwen3ConversationFormatter`):
- every assistant turn is trained, up to and including its `<|im_end|>`;
- the `\\n` after an assistant's `<|im_end|>` is not trained, and after the *last* assistant turn
  it is dropped from the ids altogether;
- an answer without reasoning is written after an empty think block that is not trained
  (`ThinkBlock` "masked", the default); "trained" trains that block too, "omitted" leaves it out
  (ms-swift style; then the non-thinking generation prompt omits it as well, so inference sees
  what training saw);
- an answer containing `<think>` and `</think>` is trained from the start of the content;
- system and user turns, and the `<|im_start|>assistant\\n` header, get -100.

The text is tokenized in runs of equal trainability, so a label boundary is always a token
boundary. Special tokens already split the text, so this equals tokenizing each whole turn
except at the start of an answer (the official code tokenizes header and answer together, so an
answer that starts with whitespace may merge with the header's last newline there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from litovis.data.sample import IMAGE_MARKER, ROLES
from litovis.model.tokens import IGNORE_INDEX, IMAGE_TOKEN_ID

ThinkBlock = Literal["masked", "trained", "omitted"]
THINK_BLOCKS: tuple[str, ...] = get_args(ThinkBlock)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
"""Qwen's end-of-text token, also its padding token."""
THINK_START = "<think>"
THINK_END = "</think>"
EMPTY_THINK = f"{THINK_START}\n\n{THINK_END}\n\n"
ASSISTANT_HEADER = f"{IM_START}assistant"
"""The start of an assistant turn (the rendered header adds a newline)."""


class ConversationError(ValueError):
    """A conversation that cannot be rendered (bad role, order or content)."""


@dataclass(frozen=True)
class Segment:
    """A run of rendered text and whether its tokens are trained (labelled)."""

    text: str
    trained: bool


@dataclass
class TokenizedChat:
    """Tokenized conversation before image expansion.

    Attributes:
        input_ids: tokenizer ids with one `IMAGE_TOKEN_ID` per `<image>` marker.
        labels: same length; the id where trained, `IGNORE_INDEX` elsewhere.
        num_images: number of `IMAGE_TOKEN_ID` placeholders.
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int


def validate_messages(messages: Sequence[Mapping[str, object]]) -> None:
    """Check roles and order: optional leading system turn, then a user turn first.

    Raises:
        ConversationError: empty conversation, unknown role, non-string content, a system turn
            that is not first, or an assistant turn before any user turn.
    """
    if not messages:
        raise ConversationError("empty conversation")
    seen_user = False
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ConversationError(f"message {index} must be a mapping with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ConversationError(f"message {index} has unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ConversationError(
                f"message {index} ({role}) content must be a string, got {type(content).__name__}"
            )
        if role == "system" and index != 0:
            raise ConversationError(f"message {index} is a system turn; only the first turn may be system")
        if role == "assistant" and not seen_user:
            raise ConversationError(f"message {index} is an assistant turn before any user turn")
        seen_user = seen_user or role == "user"
    if not seen_user:
        raise ConversationError("conversation has no user turn")


def count_image_markers(messages: Sequence[Mapping[str, object]]) -> int:
    """Number of `<image>` markers over all turns."""
    return sum(str(m["content"]).count(IMAGE_MARKER) for m in messages)


def has_reasoning(content: str) -> bool:
    """Whether an assistant answer carries its own think block (official rule: both tags present)."""
    return THINK_START in content and THINK_END in content


def validate_think_block(think_block: str) -> None:
    """Raise ValueError unless `think_block` is one of `THINK_BLOCKS`."""
    if think_block not in THINK_BLOCKS:
        raise ValueError(f"think_block must be one of {THINK_BLOCKS}, got {think_block!r}")


def render_segments(
    messages: Sequence[Mapping[str, object]],
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    think_block: ThinkBlock = "masked",
) -> list[Segment]:
    """Render a conversation into text segments labelled trained / not trained.

    Args:
        messages: `[{"role": "system"|"user"|"assistant", "content": str}]`.
        add_generation_prompt: append the assistant header for inference (the conversation must
            then not end with an assistant turn).
        enable_thinking: with `add_generation_prompt`, leave the think block open for the model;
            otherwise append the empty think block (except under `think_block="omitted"`).
        think_block: how an assistant answer without reasoning is written and trained.
    """
    validate_messages(messages)
    validate_think_block(think_block)
    if add_generation_prompt and messages[-1]["role"] == "assistant":
        raise ConversationError(
            "add_generation_prompt needs a conversation that does not end with an assistant turn"
        )

    segments: list[Segment] = []
    last = len(messages) - 1
    for index, message in enumerate(messages):
        role, content = str(message["role"]), str(message["content"])
        header = f"{IM_START}{role}\n"
        if role != "assistant":
            segments.append(Segment(f"{header}{content}{IM_END}\n", trained=False))
            continue
        if has_reasoning(content) or think_block == "omitted":
            segments.append(Segment(header, trained=False))
            segments.append(Segment(f"{content}{IM_END}", trained=True))
        elif think_block == "masked":
            segments.append(Segment(header + EMPTY_THINK, trained=False))
            segments.append(Segment(f"{content}{IM_END}", trained=True))
        else:
            segments.append(Segment(header, trained=False))
            segments.append(Segment(f"{EMPTY_THINK}{content}{IM_END}", trained=True))
        if index != last:
            # Official: the newline after <|im_end|> is input, never a target; after the last
            # assistant turn it is dropped entirely.
            segments.append(Segment("\n", trained=False))

    if add_generation_prompt:
        prompt = f"{ASSISTANT_HEADER}\n"
        if not enable_thinking and think_block != "omitted":
            prompt += EMPTY_THINK
        segments.append(Segment(prompt, trained=False))
    return _merge(segments)


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].trained == segment.trained:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trained)
        else:
            merged.append(segment)
    return merged


def render_chat(
    messages: Sequence[Mapping[str, object]],
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    think_block: ThinkBlock = "masked",
) -> str:
    """The rendered conversation as one string (with `<image>` markers still in place)."""
    segments = render_segments(
        messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        think_block=think_block,
    )
    return "".join(segment.text for segment in segments)


def tokenize_with_images(text: str, tokenizer) -> list[int]:
    """Token ids of `text` with each `<image>` marker replaced by `IMAGE_TOKEN_ID`."""
    ids: list[int] = []
    for position, chunk in enumerate(text.split(IMAGE_MARKER)):
        if position:
            ids.append(IMAGE_TOKEN_ID)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def tokenize_chat(
    messages: Sequence[Mapping[str, object]],
    tokenizer,
    *,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    think_block: ThinkBlock = "masked",
) -> TokenizedChat:
    """Render, tokenize and label a conversation (see the module docstring for the label rules).

    Args:
        tokenizer: a Hugging Face tokenizer that knows `<|im_start|>`, `<|im_end|>`, `<think>`,
            `</think>` as added tokens.
    """
    segments = render_segments(
        messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        think_block=think_block,
    )
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = tokenize_with_images(segment.text, tokenizer)
        input_ids.extend(ids)
        if segment.trained:
            labels.extend(IGNORE_INDEX if i == IMAGE_TOKEN_ID else i for i in ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
    num_images = sum(1 for i in input_ids if i == IMAGE_TOKEN_ID)
    return TokenizedChat(input_ids=input_ids, labels=labels, num_images=num_images)
