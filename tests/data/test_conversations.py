"""Conversation readers: messages, query and LLaVA layouts, turn checks, image markers."""

from __future__ import annotations

import json

import pytest

from litovis.data.conversations import (
    check_conversation,
    llava_record,
    messages_record,
    query_record,
    read_conversations,
)
from litovis.data.drops import DropReport
from litovis.data.raw_records import RowError
from tests.data.tiny_inputs import image_bytes


def _images(root):
    (root / "img").mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        (root / "img" / name).write_bytes(image_bytes())


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_messages_jsonl_good_and_malformed(tmp_path):
    _images(tmp_path)
    user, bot = "user", "assistant"
    records = [
        {"messages": [{"role": user, "content": "<image>What?"}, {"role": bot, "content": "A dog."}],
         "images": ["img/a.png"], "id": "r0"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": user, "content": "<image>1"},
                      {"role": bot, "content": "x"}, {"role": user, "content": "<image>2"},
                      {"role": bot, "content": "y"}], "images": ["img/a.png", "img/b.png"], "task": "compare"},
        {"messages": [{"role": user, "content": "hi"}, {"role": bot, "content": "hello"}]},
        "{not json",
        {"messages": [{"role": user, "content": "<image>x"}, {"role": bot, "content": "y"}], "images": []},
        {"messages": [{"role": user, "content": "x"}, {"role": bot, "content": "y"}], "images": ["img/a.png"]},
        {"messages": [{"role": bot, "content": "y"}]},
        {"messages": [{"role": user, "content": "x"}]},
        {"messages": [{"role": user, "content": "<image>x"}, {"role": bot, "content": "y"}], "images": ["img/zz.png"]},
        {"messages": [{"role": user, "content": "<image>x"}, {"role": bot, "content": "y"}], "images": ["../a.png"]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": user, "content": ["x"]}]},
        {"messages": [{"role": user, "content": "x"}, {"role": bot, "content": "<image>"}], "images": ["img/a.png"]},
        ["not", "an", "object"],
    ]
    expected = ["bad json", "image count mismatch", "image count mismatch", "bad turn order",
                "no final assistant turn", "missing image", "image outside root", "bad role",
                "content not a string", "image marker in assistant turn", "record not an object"]
    path = _jsonl(tmp_path / "m.jsonl", records)
    report = DropReport(max_examples=None)
    samples = read_conversations(path, "train", report, messages_record)
    assert [s.id for s in samples] == ["r0", "1", "2"]
    assert [s.task for s in samples] == ["chat", "compare", "chat"]
    assert samples[0].images == [str(tmp_path / "img/a.png")]
    assert samples[1].messages[0] == {"role": "system", "content": "Be brief."} and len(samples[1].images) == 2
    assert samples[2].images == [] and samples[0].target is None
    assert [e.reason for e in report.examples] == expected
    assert [e.source for e in report.examples][:1] == [f"{path}:3"]
    assert report.seen == len(records) == len(samples) + report.dropped


def test_test_split_moves_the_final_answer_to_target(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"messages": [{"role": "user", "content": "q2"}]},
    ])
    samples = read_conversations(path, "test", DropReport(), messages_record)
    assert samples[0].messages == [{"role": "user", "content": "q1"}] and samples[0].target == "a1"
    assert samples[1].messages == [{"role": "user", "content": "q2"}] and samples[1].target is None


def test_query_form_with_history_and_system(tmp_path):
    _images(tmp_path)
    path = _jsonl(tmp_path / "q.jsonl", [
        {"system": "S", "history": [["h1", "r1"]], "query": "<image>q", "response": "r", "images": ["img/a.png"]},
        {"input": "q", "output": "r"},
        {"query": "q", "history": [["only one"]], "response": "r"},
        {"response": "r"},
    ])
    report = DropReport(max_examples=None)
    samples = read_conversations(path, "train", report, query_record)
    assert samples[0].messages == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "h1"},
        {"role": "assistant", "content": "r1"}, {"role": "user", "content": "<image>q"},
        {"role": "assistant", "content": "r"}]
    assert samples[1].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert [e.reason for e in report.examples] == ["bad history", "missing query"]


def test_llava_json(tmp_path):
    _images(tmp_path / "pics")
    path = tmp_path / "l.json"
    path.write_text(json.dumps([
        {"id": "x1", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": 7, "image": ["img/a.png", "img/b.png"], "conversations": [
            {"from": "human", "value": "<image><image>Compare"}, {"from": "gpt", "value": "Same."}]},
        {"id": "x3", "conversations": [{"from": "alien", "value": "?"}]},
    ]))
    report = DropReport()
    samples = read_conversations(path, "train", report, llava_record, image_root=tmp_path / "pics")
    assert [s.id for s in samples] == ["x1", "7"]
    assert samples[0].messages[1] == {"role": "assistant", "content": "A cat."}
    assert samples[1].images == [str(tmp_path / "pics/img/a.png"), str(tmp_path / "pics/img/b.png")]
    assert report.counts == {("read", "bad role"): 1}


def test_record_converters_and_checks_directly():
    messages, images = llava_record({"image": "a.png", "conversations": [{"from": "system", "value": "s"}]})
    assert messages == [{"role": "system", "content": "s"}] and images == ["a.png"]
    assert messages_record({"messages": [], "images": "a.png"})[1] == ["a.png"]
    with pytest.raises(RowError, match="no user turn"):
        check_conversation([{"role": "system", "content": "s"}], 0, "train")
    with pytest.raises(RowError, match="empty conversation"):
        check_conversation([], 0, "train")
    with pytest.raises(RowError, match="missing messages"):
        messages_record({"conversations": []})
