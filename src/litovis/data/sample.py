"""The one record type every reader yields and every later stage consumes.

A `Sample` is either *templated* (a known task with raw `fields`, rendered into a conversation by
`litovis.data.prompts` at load time, so training and inference share one prompt) or a
*conversation* (`messages` given by the source, passed through). Images are referenced, never
loaded here: `images[i]` belongs to the i-th `<image>` marker of the rendered conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    """One training or inference example.

    Attributes:
        id: stable identifier; for test splits the submission id (challenge: the row index).
        task: task name (`captioning`, `vqa`, `summarization`, `text_qa`, `math_reasoning`,
            `dacon_vqa`, or `chat` for free conversations).
        fields: raw task inputs for templated tasks (e.g. `{"question": ...}`, `{"passage": ...}`).
        messages: the conversation for `chat` samples, `[{"role", "content"}]`; content may hold
            `<image>` markers. Empty for templated tasks until rendered.
        images: image references, one per `<image>` marker in order: a local path, an http(s) URL,
            or raw bytes/base64 before fetching (prepared data holds local paths only).
        target: the reference answer of a templated task; None on test splits.
        group: grouping key for per-group caps and leak-free splits (text_qa: the passage).
        source: `file:row` of the raw record, used in every error and drop report.
    """

    id: str
    task: str
    fields: dict[str, str] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    target: str | None = None
    group: str | None = None
    source: str = ""

    @property
    def is_conversation(self) -> bool:
        return bool(self.messages)

    def to_record(self) -> dict[str, Any]:
        """Flat, parquet-friendly dict (nested parts as JSON strings)."""
        return {
            "id": self.id,
            "task": self.task,
            "fields": json.dumps(self.fields, ensure_ascii=False),
            "messages": json.dumps(self.messages, ensure_ascii=False),
            "images": [str(i) for i in self.images],
            "target": self.target,
            "group": self.group,
            "source": self.source,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Sample:
        """Inverse of `to_record`."""
        images = record.get("images")
        return cls(
            id=str(record["id"]),
            task=str(record["task"]),
            fields=json.loads(record.get("fields") or "{}"),
            messages=json.loads(record.get("messages") or "[]"),
            images=[] if images is None else list(images),
            target=record.get("target"),
            group=record.get("group"),
            source=record.get("source") or "",
        )
