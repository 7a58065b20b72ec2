"""Per-task answer metrics: pure functions of (predictions, references), each a mean over rows.

Every metric takes two equally long sequences of strings and returns a float; row `i` pairs
`predictions[i]` with `references[i]`. Scores are fractions in [0, 1], like the model-based
BERTScore and CLIPScore of `embedding_metrics`. The definitions:

- `math_exact_match`: the final answer of a prediction is the first number after its last
  `####` (or the stripped text after it when that holds no number), normalised by
  `normalize_number` (no thousands separators, no leading `+`, no trailing decimal zeros). A
  prediction without `####` has no answer and is wrong. A reference without `####` is read as a
  bare final answer (its first number, or its stripped text).
- `normalized_exact_match`: equal after `normalize_answer` (below). Used for VQA, text QA
  accuracy and Dacon VQA accuracy.
- `token_f1` (SQuAD style): per row, the F1 of the multiset overlap of the normalised tokens;
  1 when both sides are empty, 0 when exactly one is.
- `sentence_bleu`: the mean over rows of sentence-level BLEU-4 (SacreBLEU `13a` tokenisation,
  case-sensitive, uniform weights, brevity penalty, no smoothing) via torchmetrics. As in
  every unsmoothed BLEU, a row with no matching 4-gram scores 0 — so does any prediction shorter
  than 4 tokens, even an exact match. This is the reconstructed public leaderboard metric
  ("BLEU averaged over all rows").
- `corpus_bleu`: the same BLEU-4 with n-gram counts pooled over all rows.
- `rouge_l`: the mean over rows of ROUGE-L F1 (longest common subsequence of tokens) via
  torchmetrics without stemming; its tokeniser lowercases and keeps only `[a-z0-9]` runs, so
  text in other scripts scores 0. Runs offline (no `nltk`).

`normalize_answer` is this project's normaliser: Unicode NFKC, lowercase, apostrophes deleted,
every other punctuation character (Unicode category P*) and ASCII symbol (`$+<=>^`|~`) replaced
by a space, the articles `a`/`an`/`the` removed as whole words, whitespace collapsed.
Punctuation becomes a space rather than vanishing so that `3.5` and `35` stay different.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

from litovis.inference.postprocess import find_numbers, normalize_number

Metric = Callable[[Sequence[str], Sequence[str]], float]

_MATH_MARKER = "####"
_APOSTROPHES = {"'", "\u2019", "\u2018"}
_ASCII_SYMBOLS = set("$+<=>^`|~")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: "
            "every prediction needs exactly one reference"
        )
    if not predictions:
        raise ValueError("no rows to score: predictions and references are empty")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _read_final_answer(text: str) -> str:
    numbers = find_numbers(text)
    return normalize_number(numbers[0]) if numbers else text.strip()


def extract_final_answer(text: str) -> str | None:
    """The normalised final answer after the last `####` of `text`, None without `####`."""
    if _MATH_MARKER not in text:
        return None
    return _read_final_answer(text.rsplit(_MATH_MARKER, 1)[1])


def math_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of rows whose final `####` answers agree (see the module docstring)."""
    _check_pairs(predictions, references)
    hits = []
    for prediction, reference in zip(predictions, references, strict=True):
        predicted = extract_final_answer(prediction)
        expected = extract_final_answer(reference)
        if expected is None:
            expected = _read_final_answer(reference)
        hits.append(float(predicted is not None and predicted == expected))
    return _mean(hits)


def normalize_answer(text: str) -> str:
    """Lenient form of a short answer for exact-match comparisons (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    characters = []
    for char in text:
        if char in _APOSTROPHES:
            continue
        if char in _ASCII_SYMBOLS or unicodedata.category(char).startswith("P"):
            characters.append(" ")
        else:
            characters.append(char)
    text = _ARTICLES.sub(" ", "".join(characters))
    return " ".join(text.split())


def normalized_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of rows equal after `normalize_answer`."""
    _check_pairs(predictions, references)
    return _mean(
        [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references, strict=True)]
    )


def _row_token_f1(prediction: str, reference: str) -> float:
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean SQuAD-style token F1 over rows."""
    _check_pairs(predictions, references)
    return _mean([_row_token_f1(p, r) for p, r in zip(predictions, references, strict=True)])


def _bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    from torchmetrics.functional.text import sacre_bleu_score

    score = sacre_bleu_score(
        list(predictions), [[r] for r in references], n_gram=4, smooth=False, tokenize="13a"
    )
    return float(score)


def sentence_bleu_rows(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Sentence-level BLEU-4 of each row (see the module docstring)."""
    _check_pairs(predictions, references)
    return [_bleu([p], [r]) for p, r in zip(predictions, references, strict=True)]


def sentence_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over rows of sentence-level BLEU-4 (see the module docstring)."""
    return _mean(sentence_bleu_rows(predictions, references))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level BLEU-4 with n-gram counts pooled over all rows."""
    _check_pairs(predictions, references)
    return _bleu(predictions, references)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over rows of ROUGE-L F1 (see the module docstring)."""
    from torchmetrics.functional.text.rouge import rouge_score

    _check_pairs(predictions, references)
    scores = rouge_score(
        list(predictions), list(references), rouge_keys="rougeL", use_stemmer=False
    )
    return float(scores["rougeL_fmeasure"])


# Metrics computed from text alone, by name.
TEXT_METRICS: dict[str, Metric] = {
    "exact_match": math_exact_match,
    "normalized_exact_match": normalized_exact_match,
    "accuracy": normalized_exact_match,
    "f1": token_f1,
    "bleu": sentence_bleu,
    "rouge_l": rouge_l,
}
# Text metrics per task; tasks not listed (e.g. `chat`) get `DEFAULT_TEXT_METRICS`.
TASK_TEXT_METRICS: dict[str, tuple[str, ...]] = {
    "math_reasoning": ("exact_match",),
    "vqa": ("normalized_exact_match",),
    "text_qa": ("accuracy", "f1"),
    "captioning": ("bleu", "rouge_l"),
    "summarization": ("rouge_l",),
    "dacon_vqa": ("accuracy",),
}
DEFAULT_TEXT_METRICS: tuple[str, ...] = ("bleu", "rouge_l")
# The metric of each task in the reconstructed private leaderboard; captioning and summarization
# fall back to `rouge_l` when no CLIP / BERTScore model is given.
PRIMARY_METRICS: dict[str, str] = {
    "math_reasoning": "exact_match",
    "vqa": "normalized_exact_match",
    "text_qa": "accuracy",
    "captioning": "clipscore",
    "summarization": "bertscore_f1",
    "dacon_vqa": "accuracy",
}
FALLBACK_PRIMARY_METRIC = "rouge_l"


def text_metrics_for(task: str) -> tuple[str, ...]:
    """Names of the text metrics computed for `task`."""
    return TASK_TEXT_METRICS.get(task, DEFAULT_TEXT_METRICS)


def primary_metric(task: str, available: Sequence[str]) -> str:
    """The metric that stands for `task` in a mean over tasks, given the metrics computed."""
    wanted = PRIMARY_METRICS.get(task, FALLBACK_PRIMARY_METRIC)
    return wanted if wanted in available else FALLBACK_PRIMARY_METRIC


def score_text_metrics(
    task: str,
    predictions: Sequence[str],
    references: Sequence[str],
    bleu_rows: Sequence[float] | None = None,
) -> dict[str, float]:
    """Every text metric of `task`, by name.

    `bleu_rows`: the rows' sentence BLEU when the caller already has it (`sentence_bleu_rows`);
    `bleu` is then their mean instead of being computed again.
    """
    scores = {}
    for name in text_metrics_for(task):
        if name == "bleu" and bleu_rows is not None:
            _check_pairs(predictions, references)
            if len(bleu_rows) != len(predictions):
                raise ValueError(f"{len(bleu_rows)} BLEU rows for {len(predictions)} predictions")
            scores[name] = _mean(bleu_rows)
        else:
            scores[name] = TEXT_METRICS[name](predictions, references)
    return scores
