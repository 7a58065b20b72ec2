"""Prompt templates: one per task, rendered identically for training and inference.

A template is either a string (the user turn's content) or a list of `{role, content}`
messages; `{field}` placeholders take the sample's `fields`, and `<image>` marks where each of
the sample's images goes (before the instruction, by convention). Literal braces are written
`{{` and `}}`. `render_messages` builds the conversation: for training it appends the target as
the assistant turn; for inference (`include_target=False`) the prompt is the same prefix
without it. Conversation (`chat`) samples bring their own messages and pass through. A sample
may name its template with `fields["template"]` (used by multi-question text_qa test rows);
otherwise its task names it.
"""

from __future__ import annotations

import string
from pathlib import Path

from litovis.data.sample import IMAGE_MARKER, ROLES, Sample

Template = str | list[dict[str, str]]
TEMPLATE_FIELD = "template"


class PromptError(ValueError):
    """A template is malformed or cannot be rendered for a sample."""


def placeholders(text: str) -> list[str]:
    """Names of the `{field}` placeholders in `text`; only plain names are allowed."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise PromptError(f"bad template text {text[:60]!r}: {err}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise PromptError(
                f"placeholder {{{name}}} must be a plain field name, in {text[:60]!r}"
            )
        names.append(name)
    return names


def check_template(name: str, template: object) -> Template:
    """Validate one template's structure and placeholders; return it."""
    if isinstance(template, str):
        placeholders(template)
        return template
    if isinstance(template, list) and template:
        for message in template:
            if (
                not isinstance(message, dict)
                or set(message) != {"role", "content"}
                or message["role"] not in ROLES
                or not isinstance(message["content"], str)
            ):
                raise PromptError(
                    f"template {name!r}: each message needs exactly 'role' ({'/'.join(ROLES)}) "
                    f"and string 'content', got {message!r:.80}"
                )
            placeholders(message["content"])
        return template
    raise PromptError(f"template {name!r} must be a string or a non-empty list of messages")


def load_templates(path: str | Path) -> dict[str, Template]:
    """Templates by name from a YAML mapping (see `configs/prompts.yaml`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a mapping of task name to template")
    try:
        return {str(name): check_template(str(name), t) for name, t in data.items()}
    except PromptError as err:
        raise PromptError(f"{path}: {err}") from None


def template_name(sample: Sample) -> str:
    """The template a templated sample uses: `fields["template"]`, else its task."""
    return sample.fields.get(TEMPLATE_FIELD) or sample.task


def _fill(text: str, sample: Sample) -> str:
    missing = [n for n in placeholders(text) if n not in sample.fields]
    if missing:
        raise PromptError(
            f"sample {sample.id} ({sample.source}): template {template_name(sample)!r} needs "
            f"field(s) {missing}; the sample has {sorted(sample.fields)}"
        )
    return text.format_map(sample.fields)


def render_messages(
    sample: Sample, templates: dict[str, Template], include_target: bool = True
) -> list[dict[str, str]]:
    """The conversation of one sample, shared by training and inference.

    Args:
        sample: a templated sample (task + fields) or a conversation (messages).
        templates: templates by name (`load_templates`).
        include_target: append the target as the final assistant turn (training) when the
            sample has one; False gives the prompt only, which is the same prefix.

    Conversations pass through; with `include_target=False` a final assistant turn (their
    target) is left out. Raises `PromptError` when a templated sample has no template, lacks a
    field, or the number of `<image>` markers differs from its number of images.
    """
    if sample.is_conversation:
        messages = [dict(m) for m in sample.messages]
        if not include_target and messages[-1]["role"] == "assistant":
            messages.pop()
    else:
        name = template_name(sample)
        template = templates.get(name)
        if template is None:
            raise PromptError(
                f"sample {sample.id} ({sample.source}): no template for {name!r} and no "
                f"messages; templates: {sorted(templates)}"
            )
        if isinstance(template, str):
            messages = [{"role": "user", "content": _fill(template, sample)}]
        else:
            messages = [
                {"role": m["role"], "content": _fill(m["content"], sample)} for m in template
            ]
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers != len(sample.images):
        raise PromptError(
            f"sample {sample.id} ({sample.source}): {markers} {IMAGE_MARKER} marker(s) for "
            f"{len(sample.images)} image(s)"
        )
    if include_target and sample.target is not None:
        messages.append({"role": "assistant", "content": sample.target})
    return messages
