"""The sample's generators: every reference answer is true of its input."""

from __future__ import annotations

import random
import re

import pytest

from litovis.data.sample_content import (
    COLORS,
    bill,
    caption,
    document,
    draw_scene,
    math_problem,
    passage,
    random_scene,
)

SEEDS = range(40)


@pytest.mark.parametrize("seed", SEEDS)
def test_caption_describes_the_drawn_scene(seed):
    scene = random_scene(random.Random(seed))
    text = caption(scene)
    assert text.startswith("The image shows a large") and "The overall mood of the image is" in text
    for shape in scene.shapes:
        assert f"{shape.color} {shape.kind}" in text
    main = scene.shapes[0]
    x = scene.width * {"left": 1 / 6, "center": 1 / 2, "right": 5 / 6}[main.horizontal]
    y = scene.height * {"middle": 1 / 2, "bottom": 3 / 4}[main.vertical] + 2
    pixel = draw_scene(scene).getpixel((int(x), int(y)))
    assert all(abs(a - b) <= 1 for a, b in zip(pixel, COLORS[main.color], strict=True))
    assert (scene.word is not None) == ('The word "' in text)


@pytest.mark.parametrize("seed", SEEDS)
def test_document_answers_are_printed_on_it(seed):
    doc = document(random.Random(seed))
    for _, answer in doc.qa:
        assert any(answer in line for line in doc.lines)


@pytest.mark.parametrize("seed", SEEDS)
def test_summary_opens_with_the_bills_title(seed):
    text, summary = bill(random.Random(seed))
    title = re.search(r'may be cited as the "([^"]+)"', text).group(1)
    assert summary.startswith(f"{title} - ")


@pytest.mark.parametrize("seed", SEEDS)
def test_passage_answers_come_from_the_passage(seed):
    text, qa = passage(random.Random(seed))
    assert 5 <= len(qa) <= 8 and len({q for q, _ in qa}) == len(qa)
    for _, answer in qa:
        assert answer in text


@pytest.mark.parametrize("seed", SEEDS)
def test_math_solutions_compute_their_answer(seed):
    _, solution = math_problem(random.Random(seed))
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    results = []
    for a, op, b, result in re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", solution):
        assert ops[op](int(a), int(b)) == int(result)
        if op == "/":
            assert int(a) % int(b) == 0
        results.append(int(result))
    assert len(results) == 2 and min(results) >= 0
    assert solution.splitlines()[-1] == f"#### {results[-1]}"
