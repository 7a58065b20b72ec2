"""Curation of training samples: question filters, caps, a length filter, a grouped split.

Rules run in order, each a stage of the `DropReport` (a stage sees what the previous kept):
`curate.pronoun`, `curate.leading_word`, `curate.min_words` (text_qa questions that are easy or
vague: they contain a pronoun, don't open with a question/instruction word, or are short),
`curate.group_cap` (at most N samples per group — per passage for text_qa — chosen at random),
`curate.task_cap` (at most N samples per task), `curate.max_chars` (cheap character-length
filter; token-length limits are applied at tokenization). `split_train_val` then splits each
task 90/10 by group, so a passage never lands in both splits. Randomness is seeded per task, so
adding a task never changes which samples another task keeps. Sample order is preserved.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field

from litovis.data.drops import DropReport
from litovis.data.sample import Sample

DEFAULT_PRONOUNS = (
    "it", "this", "that", "these", "those", "he", "she", "they", "them", "him", "her", "his",
    "its", "their", "theirs",
)
DEFAULT_LEADING_WORDS = (
    "what", "how", "why", "when", "where", "who", "whom", "whose", "which", "is", "are", "was",
    "were", "did", "do", "does", "can", "could", "has", "have", "had", "will", "would", "should",
    "list", "name", "describe", "define", "according", "explain", "identify", "give", "state",
)


@dataclass
class CurationConfig:
    """Which training samples to keep, and how to split them.

    Attributes:
        question_tasks: tasks whose `question` field the three question filters apply to.
        pronouns: a question containing any of these whole words (case-insensitive) is dropped;
            empty disables the rule.
        leading_words: a question must start with one of these words (case-insensitive);
            empty disables the rule.
        min_question_words: a question needs at least this many words; 0 disables the rule.
        group_caps: task -> most samples kept per group (text_qa groups are passages).
        task_caps: task -> most samples kept for the task (random subset); empty = no caps.
        max_chars: drop samples whose text (fields, messages, target) is longer; None = off.
        val_fraction: share of each task's groups held out for validation (0 = no split).
    """

    question_tasks: list[str] = field(default_factory=lambda: ["text_qa"])
    pronouns: list[str] = field(default_factory=lambda: list(DEFAULT_PRONOUNS))
    leading_words: list[str] = field(default_factory=lambda: list(DEFAULT_LEADING_WORDS))
    min_question_words: int = 6
    group_caps: dict[str, int] = field(default_factory=lambda: {"text_qa": 3})
    task_caps: dict[str, int] = field(default_factory=dict)
    max_chars: int | None = None
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name, caps in (("group_caps", self.group_caps), ("task_caps", self.task_caps)):
            bad = {task: cap for task, cap in caps.items() if cap < 1}
            if bad:
                raise ValueError(f"{name} must be >= 1, got {bad}")


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random(":".join([str(seed), *parts]))


def _first_word(text: str) -> str:
    match = re.match(r"\W*(\w+)", text)
    return match.group(1).lower() if match else ""


def filter_questions(
    samples: list[Sample], config: CurationConfig, report: DropReport
) -> list[Sample]:
    """Apply the pronoun, leading-word and minimum-length rules to questions of `question_tasks`."""
    pronoun = (
        re.compile(r"\b(?:" + "|".join(map(re.escape, config.pronouns)) + r")\b", re.IGNORECASE)
        if config.pronouns
        else None
    )
    leading = {w.lower() for w in config.leading_words}
    rules = [
        ("curate.pronoun", "pronoun", lambda q: pronoun is None or not pronoun.search(q)),
        ("curate.leading_word", "no leading question word",
         lambda q: not leading or _first_word(q) in leading),
        ("curate.min_words", f"fewer than {config.min_question_words} words",
         lambda q: len(q.split()) >= config.min_question_words),
    ]
    for stage, reason, passes in rules:
        kept = []
        for sample in samples:
            question = sample.fields.get("question")
            applies = sample.task in config.question_tasks and question is not None
            if applies and not passes(question):
                report.drop(stage, reason, sample.source, f"sample {sample.id}: {question[:80]!r}")
            else:
                report.keep(stage)
                kept.append(sample)
        samples = kept
    return samples


def _unit(sample: Sample, index: int) -> str:
    """Grouping key: the sample's group, or a key of its own when it has none."""
    return sample.group if sample.group is not None else f"\0{index}"


def cap_groups(
    samples: list[Sample], caps: dict[str, int], seed: int, report: DropReport
) -> list[Sample]:
    """Keep at most `caps[task]` samples per group (random, seeded); others pass untouched."""
    chosen: set[int] = set()
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        if sample.task in caps:
            groups[(sample.task, _unit(sample, index))].append(index)
        else:
            chosen.add(index)
    rngs = {task: _rng(seed, "group_cap", task) for task in caps}
    for (task, _), members in groups.items():
        cap = caps[task]
        chosen.update(members if len(members) <= cap else rngs[task].sample(members, cap))
    return _keep_chosen(samples, chosen, "curate.group_cap", "over group cap", report)


def cap_tasks(
    samples: list[Sample], caps: dict[str, int], seed: int, report: DropReport
) -> list[Sample]:
    """Keep at most `caps[task]` samples of each capped task (random, seeded)."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        by_task[sample.task].append(index)
    chosen: set[int] = set()
    for task, members in by_task.items():
        cap = caps.get(task)
        if cap is None or len(members) <= cap:
            chosen.update(members)
        else:
            chosen.update(_rng(seed, "task_cap", task).sample(members, cap))
    return _keep_chosen(samples, chosen, "curate.task_cap", "over task cap", report)


def _keep_chosen(
    samples: list[Sample], chosen: set[int], stage: str, reason: str, report: DropReport
) -> list[Sample]:
    kept = []
    for index, sample in enumerate(samples):
        if index in chosen:
            report.keep(stage)
            kept.append(sample)
        else:
            report.drop(stage, reason, sample.source, f"sample {sample.id} (group {sample.group})")
    return kept


def text_length(sample: Sample) -> int:
    """Characters of all text in a sample: field values, message contents and target."""
    return (
        sum(len(v) for v in sample.fields.values())
        + sum(len(m["content"]) for m in sample.messages)
        + len(sample.target or "")
    )


def filter_length(samples: list[Sample], max_chars: int | None, report: DropReport) -> list[Sample]:
    """Drop samples whose `text_length` exceeds `max_chars` (no-op when None)."""
    if max_chars is None:
        return samples
    kept = []
    for sample in samples:
        length = text_length(sample)
        if length > max_chars:
            detail = f"{length} chars > {max_chars}"
            report.drop("curate.max_chars", "too long", sample.source, detail)
        else:
            report.keep("curate.max_chars")
            kept.append(sample)
    return kept


def curate(
    samples: list[Sample], config: CurationConfig, seed: int = 42
) -> tuple[list[Sample], DropReport]:
    """Run every curation rule in order: (kept samples in input order, drop report)."""
    report = DropReport()
    samples = filter_questions(samples, config, report)
    samples = cap_groups(samples, config.group_caps, seed, report)
    samples = cap_tasks(samples, config.task_caps, seed, report)
    samples = filter_length(samples, config.max_chars, report)
    return samples, report


def split_train_val(
    samples: list[Sample], val_fraction: float, seed: int = 42
) -> tuple[list[Sample], list[Sample]]:
    """Stratified, grouped split: per task about `val_fraction` of samples go to validation.

    Whole groups move together, so one passage never lands in both splits. A task with at least
    two groups gets at least one validation group when `val_fraction > 0`, and never loses all
    of its training groups. Both outputs keep input order.
    """
    units: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, sample in enumerate(samples):
        units[sample.task][_unit(sample, index)].append(index)
    val: set[int] = set()
    for task in sorted(units):
        groups = list(units[task].values())
        if val_fraction <= 0 or len(groups) < 2:
            continue
        _rng(seed, "split", task).shuffle(groups)
        total = sum(len(g) for g in groups)
        target = max(1, round(total * val_fraction))
        taken = 0
        for members in groups[:-1]:  # the last group always stays in training
            if taken >= target:
                break
            val.update(members)
            taken += len(members)
    train = [s for i, s in enumerate(samples) if i not in val]
    return train, [s for i, s in enumerate(samples) if i in val]
