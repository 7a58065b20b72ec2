"""Per-task answer metrics checked against hand-computed values: exact match, token F1, BLEU, ROUGE-L."""

from __future__ import annotations

import math

import pytest

from litovis.evaluation.metrics import (
    corpus_bleu,
    extract_final_answer,
    math_exact_match,
    normalize_answer,
    normalized_exact_match,
    primary_metric,
    rouge_l,
    score_text_metrics,
    sentence_bleu,
    sentence_bleu_rows,
    token_f1,
)


def test_extract_final_answer() -> None:
    assert extract_final_answer("12 + 3 = 15\n#### 1,234") == "1234"
    assert extract_final_answer("#### 7\nwait\n#### +8.50 dollars") == "8.5"
    assert extract_final_answer("#### five") == "five"
    assert extract_final_answer("the answer is 9") is None


def test_math_exact_match() -> None:
    predictions = [
        "so 1,000 + 234 = 1,234\n#### 1,234",  # commas normalised        -> hit
        "#### 5.0",                            # trailing .0              -> hit
        "the answer is 7",                     # no #### at all           -> miss
        "#### -3",                             # sign matters             -> miss
        "#### +12 dollars",                    # leading + and units      -> hit
        "#### 7\nno wait\n#### 8",             # the last #### counts     -> hit
    ]
    references = ["... #### 1234", "#### 5", "#### 7", "#### 3", "#### 12", "#### 8"]
    assert math_exact_match(predictions, references) == pytest.approx(4 / 6)
    # A reference without #### is a bare final answer.
    assert math_exact_match(["#### 42", "#### 41"], ["42", "42.0"]) == pytest.approx(1 / 2)


def test_normalize_answer() -> None:
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("Don’t stop") == "dont stop"
    assert normalize_answer("New-York, U.S.A.") == "new york u s"  # "a" is an article once split
    assert normalize_answer("3.5") == "3 5" != normalize_answer("35")
    assert normalize_answer("ＡＢＣ") == "abc"  # NFKC folds full-width letters
    assert normalize_answer("theory anthem") == "theory anthem"  # articles only as whole words


def test_normalized_exact_match() -> None:
    predictions = ["The Eiffel Tower!", "new-york", "3.5", "an apple", "Don't stop", "東京"]
    references = ["eiffel tower", "New York", "35", "apple", "dont stop", "東京。"]
    # hits: 1, 1, 0 ("3 5" vs "35"), 1, 1, 1 (the ideographic full stop is punctuation) = 5 / 6
    assert normalized_exact_match(predictions, references) == pytest.approx(5 / 6)


def test_token_f1() -> None:
    predictions = ["the big red car", "", "x", "red red blue"]
    references = ["a red car", "", "", "red blue blue"]
    # row 1: {big, red, car} vs {red, car}: overlap 2, P = 2/3, R = 1, F1 = 2·(2/3)/(5/3) = 0.8
    # row 2: both empty -> 1;  row 3: one side empty -> 0
    # row 4: overlap min(2,1) red + min(1,2) blue = 2, P = R = 2/3, F1 = 2/3
    expected = (0.8 + 1 + 0 + 2 / 3) / 4
    assert token_f1(predictions, references) == pytest.approx(expected)


def test_sentence_bleu_by_hand() -> None:
    # "the cat sat on the mat" vs "the cat sat on a mat", 6 tokens each (BP = 1):
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3
    # -> BLEU = (5/6 · 3/5 · 2/4 · 1/3)^(1/4) = (1/12)^(1/4)
    full = (1 / 12) ** 0.25
    score = sentence_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert score == pytest.approx(full, abs=1e-6)
    # 4 of 6 tokens, every n-gram matches: BLEU = BP = exp(1 - 6/4)
    short = math.exp(-0.5)
    score = sentence_bleu(["the cat sat on"], ["the cat sat on the mat"])
    assert score == pytest.approx(short, abs=1e-6)
    # Shorter than 4 tokens: no 4-gram at all, so 0 even for an exact match.
    predictions = ["the cat sat on the mat", "the cat sat on", "red"]
    references = ["the cat sat on a mat", "the cat sat on the mat", "red"]
    assert sentence_bleu(predictions, references) == pytest.approx((full + short + 0) / 3, abs=1e-6)


def test_corpus_bleu_by_hand() -> None:
    predictions = ["the cat sat on the mat", "the cat sat on"]
    references = ["the cat sat on a mat", "the cat sat on the mat"]
    # pooled precisions (5+4)/(6+4), (3+3)/(5+3), (2+2)/(4+2), (1+1)/(3+1); lengths 10 vs 12
    geometric = (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25
    expected = math.exp(1 - 12 / 10) * geometric
    assert corpus_bleu(predictions, references) == pytest.approx(expected, abs=1e-6)


def test_rouge_l_by_hand() -> None:
    # LCS("a b c d", "a c d e") = "a c d": P = R = 3/4, F = 0.75
    # LCS("the cat", "the cat sat on the mat") = 2: P = 1, R = 1/3, F = 2·(1/3)/(4/3) = 0.5
    score = rouge_l(["a b c d", "the cat"], ["a c d e", "the cat sat on the mat"])
    assert score == pytest.approx(0.625, abs=1e-6)
    # Lowercased, punctuation dropped: identical token sequences.
    assert rouge_l(["The CAT, sat!"], ["the cat sat"]) == pytest.approx(1.0)
    assert rouge_l([""], ["the cat"]) == 0.0


def test_rouge_l_matches_an_independent_lcs() -> None:
    def lcs(a: list[str], b: list[str]) -> int:
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                if x == y:
                    table[i + 1][j + 1] = table[i][j] + 1
                else:
                    table[i + 1][j + 1] = max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    prediction = "the quick brown fox jumps over the lazy dog near the river bank".split()
    reference = "a quick fox jumped over a lazy brown dog by the bank of the river".split()
    common = lcs(prediction, reference)
    precision, recall = common / len(prediction), common / len(reference)
    expected = 2 * precision * recall / (precision + recall)
    score = rouge_l([" ".join(prediction)], [" ".join(reference)])
    assert score == pytest.approx(expected, abs=1e-6)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        token_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no rows"):
        sentence_bleu([], [])


def test_task_metric_defaults() -> None:
    assert set(score_text_metrics("math_reasoning", ["#### 1"], ["#### 1"])) == {"exact_match"}
    scores = score_text_metrics("text_qa", ["red car"], ["the red car"])
    assert scores == {"accuracy": 1.0, "f1": 1.0}
    assert set(score_text_metrics("captioning", ["a b"], ["a b"])) == {"bleu", "rouge_l"}
    assert set(score_text_metrics("chat", ["a b"], ["a b"])) == {"bleu", "rouge_l"}
    assert primary_metric("captioning", ["bleu", "rouge_l"]) == "rouge_l"
    assert primary_metric("captioning", ["bleu", "rouge_l", "clipscore"]) == "clipscore"
    assert primary_metric("dacon_vqa", ["accuracy"]) == "accuracy"


def test_known_row_bleu_is_reused_not_recomputed() -> None:
    predictions = ["the cat sat on the mat", "the cat sat on"]
    references = ["the cat sat on a mat", "the cat sat on the mat"]
    rows = sentence_bleu_rows(predictions, references)
    assert rows == [pytest.approx(sentence_bleu([p], [r])) for p, r in zip(predictions, references, strict=True)]
    assert score_text_metrics("captioning", predictions, references, [0.25, 0.75])["bleu"] == 0.5
    assert score_text_metrics("captioning", predictions, references)["bleu"] == pytest.approx(sum(rows) / 2)
    with pytest.raises(ValueError, match="1 BLEU rows for 2 predictions"):
        score_text_metrics("captioning", predictions, references, [0.5])
