"""Curation rules (each reports its drops) and the stratified, grouped split."""

from __future__ import annotations

from collections import Counter

import pytest

from litovis.data.curate import (
    CurationConfig,
    cap_groups,
    cap_tasks,
    curate,
    filter_length,
    filter_questions,
    split_train_val,
)
from litovis.data.drops import DropReport


def _qa(question: str, i: int = 0, group: str = "g") -> object:
    from litovis.data.sample import Sample

    return Sample(id=f"{group}-{i}", task="text_qa", fields={"text": "p", "question": question},
                  target="a", group=group, source=f"f:{group}")


def _plain(task: str, i: int, group: str | None = None):  # noqa: ANN202
    from litovis.data.sample import Sample

    return Sample(id=f"{task}-{i}", task=task, fields={"text": "x" * (i + 1)}, target="t", group=group,
                  source=f"f:{i}")


def test_question_filters_each_report_their_drops():
    questions = {
        "What is the name of the dog in the story?": True,
        "What did he say to the old man at the gate?": False,      # pronoun "he"
        "Why did Ann's brother leave THEIR house early?": False,   # pronoun, any case
        "Which city hosts the annual spring music festival?": True,
        "The festival is held in which city today?": False,        # no leading question word
        "Where does Ann live?": False,                             # 4 words
        "Ithaca is where the festival took place, right?": False,  # "Ithaca" is not "it"...
        "Is Ithaca the city where the festival happened?": True,   # ...and not a pronoun match
    }
    samples = [_qa(q, i) for i, q in enumerate(questions)]
    samples.append(_plain("vqa", 0))  # no question: untouched
    report = DropReport(max_examples=None)
    kept = filter_questions(samples, CurationConfig(), report)
    assert [s.fields.get("question") for s in kept] == [q for q, ok in questions.items() if ok] + [None]
    assert report.counts == {("curate.pronoun", "pronoun"): 2,
                             ("curate.leading_word", "no leading question word"): 2,
                             ("curate.min_words", "fewer than 6 words"): 1}
    assert report.stages["curate.leading_word"].seen == report.stages["curate.pronoun"].kept
    report.check()


def test_filters_are_configurable_and_can_be_disabled():
    samples = [_qa("What did he say?")]
    config = CurationConfig(pronouns=[], leading_words=[], min_question_words=0)
    assert filter_questions(samples, config, DropReport()) == samples
    config = CurationConfig(question_tasks=["vqa"])
    assert filter_questions(samples, config, DropReport()) == samples


def test_group_cap_keeps_at_most_n_per_passage_reproducibly():
    samples = [_qa(f"q{i}", i, group=f"p{i % 3}") for i in range(15)] + [_plain("vqa", i) for i in range(4)]
    report = DropReport()
    kept = cap_groups(samples, {"text_qa": 3}, seed=42, report=report)
    per_group = Counter(s.group for s in kept if s.task == "text_qa")
    assert per_group == {"p0": 3, "p1": 3, "p2": 3}
    assert sum(s.task == "vqa" for s in kept) == 4
    assert report.counts == {("curate.group_cap", "over group cap"): 6}
    assert [s.id for s in kept] == [s.id for s in samples if s in kept]  # input order kept
    again = cap_groups(samples, {"text_qa": 3}, seed=42, report=DropReport())
    other = cap_groups(samples, {"text_qa": 3}, seed=7, report=DropReport())
    assert [s.id for s in again] == [s.id for s in kept]
    assert [s.id for s in other] != [s.id for s in kept]


def test_task_cap_and_length_filter():
    samples = [_plain("vqa", i) for i in range(10)] + [_plain("captioning", i) for i in range(3)]
    report = DropReport()
    kept = cap_tasks(samples, {"vqa": 4}, seed=1, report=report)
    assert Counter(s.task for s in kept) == {"vqa": 4, "captioning": 3}
    assert report.counts == {("curate.task_cap", "over task cap"): 6}
    report = DropReport()
    short = filter_length(samples, max_chars=4, report=report)  # text of sample i has i+1 chars, target 1
    assert {s.id for s in short} == {"vqa-0", "vqa-1", "vqa-2", "captioning-0", "captioning-1", "captioning-2"}
    assert report.counts == {("curate.max_chars", "too long"): 7}
    assert filter_length(samples, None, DropReport()) == samples


def test_curate_chains_rules_and_keeps_the_invariant():
    samples = [_qa("What is the name of the tall tree near the lake?", i, group=f"p{i % 2}") for i in range(10)]
    samples += [_qa("Where is Ann?", 99)]
    kept, report = curate(samples, CurationConfig(), seed=42)
    assert len(kept) == 6
    assert report.counts == {("curate.min_words", "fewer than 6 words"): 1, ("curate.group_cap", "over group cap"): 4}
    report.check()
    assert report.stages["curate.pronoun"].seen == len(samples)


def test_split_is_stratified_grouped_and_seeded():
    samples = [_qa(f"q{i}", i, group=f"p{i // 3}") for i in range(300)]  # 100 passages × 3
    samples += [_plain("vqa", i) for i in range(200)] + [_plain("math", i) for i in range(40)]
    train, val = split_train_val(samples, 0.1, seed=42)
    assert len(train) + len(val) == len(samples)
    for task, total in (("text_qa", 300), ("vqa", 200), ("math", 40)):
        share = sum(s.task == task for s in val) / total
        assert share == pytest.approx(0.1, abs=0.011), task
    assert not {s.group for s in train if s.task == "text_qa"} & {s.group for s in val if s.task == "text_qa"}
    assert [s.id for s in val] == [s.id for s in samples if s in val]
    again_train, again_val = split_train_val(samples, 0.1, seed=42)
    assert [s.id for s in again_val] == [s.id for s in val]
    assert [s.id for s in split_train_val(samples, 0.1, seed=1)[1]] != [s.id for s in val]


def test_split_small_tasks_and_zero_fraction():
    samples = [_plain("tiny", i) for i in range(3)] + [_plain("single", 0)]
    train, val = split_train_val(samples, 0.1)
    assert sum(s.task == "tiny" for s in val) == 1  # at least one validation sample...
    assert [s.task for s in train].count("single") == 1  # ...but a lone sample stays in training
    assert split_train_val(samples, 0.0) == (samples, [])


def test_config_validation():
    with pytest.raises(ValueError, match="val_fraction"):
        CurationConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="group_caps"):
        CurationConfig(group_caps={"text_qa": 0})
