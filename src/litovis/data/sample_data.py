"""Generate the small bundled dataset under `data/sample/`: `python -m litovis.data.sample_data`.

Deterministic (fixed seed) and offline: images are tiny pictures of shapes and short documents
drawn with Pillow, so captions and answers are true statements about them. Written:
- `challenge/train.parquet` (16 rows per task; images inline as base64; text_qa rows nested
  like the real data) and `challenge/test.parquet` (4 rows per task in task order, no output;
  two text_qa test rows hold several questions);
- `dacon/` with `train.csv`, `test.csv`, `sample_submission.csv` and `image/{train,test}/`;
- `chat/` with a messages JSONL (multi-turn, system, two-image and text-only records), a query
  form JSONL and a LLaVA JSON, and their images.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import random
from pathlib import Path

from litovis.data.sample_content import (
    Scene,
    bill,
    caption,
    document,
    draw_document,
    draw_scene,
    math_problem,
    passage,
    random_scene,
)

SEED = 20250901
TRAIN_ROWS_PER_TASK = 16
TEST_ROWS_PER_TASK = 4


def _encode(image, fmt: str) -> bytes:  # noqa: ANN001 - a PIL image
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 85} if fmt == "JPEG" else {"optimize": True}))
    return buffer.getvalue()


def _b64(image, fmt: str) -> str:  # noqa: ANN001
    return base64.b64encode(_encode(image, fmt)).decode("ascii")


def challenge_rows(rng: random.Random, n: int, test: bool) -> list[dict]:
    """Rows in the challenge layout, `n` per task, grouped by task."""
    rows: list[dict] = []
    for _ in range(n):
        scene = random_scene(rng)
        rows.append({"task": "captioning", "input_type": "image",
                     "input": _b64(draw_scene(scene), "JPEG"), "question": None,
                     "output": caption(scene)})
    for _ in range(n):
        doc = document(rng)
        question, answer = rng.choice(doc.qa)
        rows.append({"task": "vqa", "input_type": "image",
                     "input": _b64(draw_document(doc), "PNG"), "question": question,
                     "output": answer})
    for _ in range(n):
        text, summary = bill(rng)
        rows.append({"task": "summarization", "input_type": "text", "input": text,
                     "question": None, "output": summary})
    for i in range(n):
        text, qa = passage(rng)
        if test:  # one question per row, except two rows that carry several
            qa = qa[:3] if i % 2 else qa[:1]
        rows.append({"task": "text_qa", "input_type": "text", "input": text,
                     "question": repr([q for q, _ in qa]),
                     "output": repr({"input_text": [a for _, a in qa]})})
    for _ in range(n):
        problem, solution = math_problem(rng)
        rows.append({"task": "math_reasoning", "input_type": "text", "input": problem,
                     "question": None, "output": solution})
    if test:
        for row in rows:
            del row["output"]
    return rows


def _write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _dacon_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    main = scene.shapes[0]
    kinds = {s.kind for s in scene.shapes}
    absent = rng.choice([k for k in ("circle", "square", "triangle") if k not in kinds] or ["star"])
    present = rng.choice(sorted(kinds))
    return [
        (f"What color is the {main.kind}?", main.color),
        ("How many shapes are in the picture?", str(len(scene.shapes))),
        (f"Is there a {absent} in the image?", "no"),
        (f"Is there a {present} in the image?", "yes"),
    ]


def write_dacon(root: Path, rng: random.Random) -> None:
    """Dacon-layout CSVs and images: 10 train images × 3 questions, 4 test images × 2."""
    for split, n_images, per_image in (("train", 10, 3), ("test", 4, 2)):
        (root / "image" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n_images):
            scene = random_scene(rng)
            image_id = f"{split}_{i:05d}"
            draw_scene(scene).save(root / "image" / split / f"{image_id}.jpg", quality=85)
            for question, answer in rng.sample(_dacon_questions(scene, rng), per_image):
                rows.append({"ID": f"{split.upper()}_{len(rows):06d}", "image_id": image_id,
                             "question": question, "answer": answer})
        columns = ["ID", "image_id", "question"] + (["answer"] if split == "train" else [])
        with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        if split == "test":
            with (root / "sample_submission.csv").open("w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["ID", "answer"])
                writer.writerows([r["ID"], ""] for r in rows)


def write_chat(root: Path, rng: random.Random) -> None:
    """Conversation files in the messages, query and LLaVA layouts, with their images."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes = [random_scene(rng) for _ in range(6)]
    for i, scene in enumerate(scenes):
        draw_scene(scene).save(images / f"scene_{i}.png", optimize=True)

    def main_shape(i: int) -> str:
        s = scenes[i].shapes[0]
        return f"a {s.color} {s.kind}"

    messages = [
        {"messages": [{"role": "user",
                       "content": "<image>What is the largest shape in this picture?"},
                      {"role": "assistant", "content": f"The largest shape is {main_shape(0)}."}],
         "images": ["images/scene_0.png"]},
        {"messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "<image>\nWhat color is the background?"},
            {"role": "assistant", "content": f"The background is {scenes[1].background}."},
            {"role": "user", "content": "How many shapes can you see?"},
            {"role": "assistant", "content": f"I can see {len(scenes[1].shapes)}."}],
         "images": ["images/scene_1.png"]},
        {"messages": [
            {"role": "user",
             "content": "Picture A: <image>\nPicture B: <image>\nWhich picture has more shapes?"},
            {"role": "assistant", "content": (
                "Picture A has more shapes." if len(scenes[2].shapes) > len(scenes[3].shapes)
                else "Picture B has more shapes." if len(scenes[3].shapes) > len(scenes[2].shapes)
                else "Both pictures have the same number of shapes.")}],
         "images": ["images/scene_2.png", "images/scene_3.png"], "task": "compare"},
        {"messages": [{"role": "user", "content": "Name three primary colors."},
                      {"role": "assistant", "content": "Red, yellow and blue."}]},
    ]
    with (root / "messages.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(m, ensure_ascii=False) + "\n" for m in messages)
    queries = [
        {"query": "<image>Describe the picture in one sentence.",
         "response": caption(scenes[4]).split(". ")[0] + ".", "images": ["images/scene_4.png"]},
        {"system": "Be brief.", "history": [["What is 2 + 3?", "5"]],
         "query": "And 5 times 4?", "response": "20"},
    ]
    with (root / "query.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in queries)
    llava = [
        {"id": "llava-0", "image": "images/scene_5.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is on the picture?"},
            {"from": "gpt", "value": f"There is {main_shape(5)}."}]},
        {"id": "llava-1", "image": ["images/scene_0.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the background?"},
            {"from": "gpt", "value": f"It is {scenes[0].background}."},
            {"from": "human", "value": "Is the picture busy or simple?"},
            {"from": "gpt", "value": "Simple: a few flat shapes on a plain background."}]},
    ]
    (root / "llava.json").write_text(json.dumps(llava, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")


def generate(out: Path) -> None:
    """Write the whole bundled sample under `out` (files are overwritten)."""
    rng = random.Random(SEED)
    challenge = out / "challenge"
    train = challenge_rows(rng, TRAIN_ROWS_PER_TASK, test=False)
    _write_parquet(train, challenge / "train.parquet")
    _write_parquet(challenge_rows(rng, TEST_ROWS_PER_TASK, test=True), challenge / "test.parquet")
    write_dacon(out / "dacon", rng)
    write_chat(out / "chat", rng)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder")
    args = parser.parse_args(argv)
    generate(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
