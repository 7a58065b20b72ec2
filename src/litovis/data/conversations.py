"""Readers for conversation datasets users already have: messages, query/response, LLaVA.

Three JSON/JSONL layouts become `chat` samples (or the record's own `task`) with `messages`:
- messages (MS-Swift / LLaMA-Factory): `{"messages": [{"role", "content"}...], "images": [...]}`;
- query (MS-Swift): `{"query"|"input", "response"|"output", "system"?, "history"?, "images"?}`,
  `history` being `[[query, response], ...]` turns before the query;
- LLaVA: `{"id", "image": str | [str], "conversations": [{"from": human|gpt|system, "value"}]}`.

Every conversation is checked the same way: an optional first system turn, then user/assistant
alternating from a user turn; string contents; no `<image>` in assistant turns; exactly one
`<image>` marker per image, in order. Train/val conversations must end with an assistant turn;
on a test split a final assistant turn is moved into `target` (the reference) so `messages` ends
with the user turn to answer. Image paths are relative to `image_root` (default: the file's
folder), http(s) URLs are kept for fetching, and files outside the root are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from litovis.data.drops import DropReport
from litovis.data.raw_records import ImageRoot, RowError, read_json_records, require_file
from litovis.data.sample import IMAGE_MARKER, ROLES, Sample

CHAT_TASK = "chat"
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}

Converter = Callable[[dict[str, Any]], tuple[list[dict[str, str]], list[Any]]]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} not a string", f"got {type(value).__name__}")
    return value


def _image_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v["path"] if isinstance(v, dict) and "path" in v else v for v in value]
    raise RowError("bad images", f"expected a list of paths, got {type(value).__name__}")


def messages_record(record: dict[str, Any]) -> tuple[list[dict[str, str]], list[Any]]:
    """(messages, image refs) of a messages-format record."""
    raw = record.get("messages")
    if not isinstance(raw, list):
        raise RowError("missing messages", "expected a 'messages' list")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RowError("bad message", "each message needs 'role' and 'content'")
        role = turn["role"]
        if role not in ROLES:
            raise RowError("bad role", repr(role))
        messages.append({"role": role, "content": _text(turn["content"], "content")})
    return messages, _image_list(record.get("images"))


def query_record(record: dict[str, Any]) -> tuple[list[dict[str, str]], list[Any]]:
    """(messages, image refs) of an MS-Swift query/response record."""
    query = record.get("query", record.get("input"))
    if query is None:
        raise RowError("missing query", "expected 'query' or 'input'")
    messages = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _text(record["system"], "system")})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RowError("bad history", "expected a list of [query, response] pairs")
    for pair in history:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError("bad history", "expected a list of [query, response] pairs")
        messages.append({"role": "user", "content": _text(pair[0], "history query")})
        messages.append({"role": "assistant", "content": _text(pair[1], "history response")})
    messages.append({"role": "user", "content": _text(query, "query")})
    response = record.get("response", record.get("output"))
    if response is not None:
        messages.append({"role": "assistant", "content": _text(response, "response")})
    return messages, _image_list(record.get("images"))


def llava_record(record: dict[str, Any]) -> tuple[list[dict[str, str]], list[Any]]:
    """(messages, image refs) of a LLaVA record."""
    raw = record.get("conversations")
    if not isinstance(raw, list):
        raise RowError("missing conversations", "expected a 'conversations' list")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError("bad message", "each turn needs 'from' and 'value'")
        role = _LLAVA_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise RowError("bad role", repr(turn["from"]))
        messages.append({"role": role, "content": _text(turn["value"], "value")})
    return messages, _image_list(record.get("image"))


def check_conversation(messages: list[dict[str, str]], n_images: int, split: str) -> str | None:
    """Validate turn order and image markers; on test pop a final assistant turn as the target.

    Returns the popped target (test only) or None; raises `RowError` when malformed.
    """
    if not messages:
        raise RowError("empty conversation")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise RowError("bad turn order", f"turn {i} is {turn['role']}, expected {expected}")
        if turn["role"] == "assistant" and IMAGE_MARKER in turn["content"]:
            raise RowError("image marker in assistant turn", f"turn {i}")
    if not body:
        raise RowError("no user turn")
    markers = sum(turn["content"].count(IMAGE_MARKER) for turn in messages)
    if markers != n_images:
        raise RowError(
            "image count mismatch", f"{markers} {IMAGE_MARKER} markers, {n_images} images"
        )
    if split != "test":
        if body[-1]["role"] != "assistant":
            raise RowError("no final assistant turn")
        return None
    return messages.pop()["content"] if body[-1]["role"] == "assistant" else None


def _record_id(record: dict[str, Any], index: int) -> str:
    value = record.get("id")
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    return str(index)


def _record_task(record: dict[str, Any]) -> str:
    task = record.get("task")
    if task is None:
        return CHAT_TASK
    if not isinstance(task, str) or not task.strip():
        raise RowError("bad task", repr(task))
    return task.strip()


def read_conversations(
    path: str | Path,
    split: str,
    report: DropReport,
    convert: Converter,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
    stage: str = "read",
) -> list[Sample]:
    """Samples of a conversation JSON/JSONL file, converted record by record with `convert`.

    Args:
        path: a `.json` list or a `.jsonl` file.
        split: `train`/`val` or `test` (see the module docstring for the final turn).
        report: receives one keep/drop per record.
        convert: `messages_record`, `query_record` or `llava_record`.
        image_root: folder that relative image paths are relative to; default the file's folder.
        allow_outside_root: accept image files resolving outside `image_root`.
        stage: stage name in `report`.
    """
    path = require_file(path, "conversation file")
    root = ImageRoot(
        Path(image_root) if image_root is not None else path.parent, allow_outside_root
    )
    samples: list[Sample] = []
    for index, record in read_json_records(path):
        source = f"{path}:{index}"
        try:
            if isinstance(record, RowError):
                raise record
            if not isinstance(record, dict):
                raise RowError("record not an object", f"got {type(record).__name__}")
            messages, images = convert(record)
            target = check_conversation(messages, len(images), split)
            sample = Sample(
                id=_record_id(record, index),
                task=_record_task(record),
                messages=messages,
                images=[root.resolve(ref) for ref in images],
                target=target,
                source=source,
            )
        except RowError as err:
            report.drop(stage, err.reason, source, err.detail)
            continue
        report.keep(stage)
        samples.append(sample)
    return samples
