"""Batched generation with the static KV cache: greedy, eos, padding, sampling, thinking budget."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from litovis.model.checkpoint import build_ovis
from litovis.model.generation import (
    GenerationConfig,
    choose_tokens,
    process_logits,
    thinking_closed,
    uniform_draws,
)
from litovis.model.ovis import Ovis2_5
from litovis.model.presets import preset

PAD = 0


@pytest.fixture(scope="module")
def model() -> Ovis2_5:
    """Tiny random model in float64, so batch/no-cache comparisons are free of near-ties."""
    torch.manual_seed(0)
    return build_ovis(preset("tiny"), dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def prompts() -> dict:
    """Two left-padded prompts; the first holds one 4x4-patch image (4 atoms)."""
    gen = torch.Generator().manual_seed(1)
    image_row = [11, 12, -301, -300, -300, -300, -300, -302, 13, 14]
    text_row = [PAD, PAD, PAD, PAD, 21, 22, 23, 24, 25, 26]
    return {
        "input_ids": torch.tensor([image_row, text_row]),
        "attention_mask": torch.tensor([[1] * 10, [0] * 4 + [1] * 6]),
        "pixel_values": torch.rand(16, 768, generator=gen, dtype=torch.float64) * 2 - 1,
        "grid_thws": torch.tensor([[1, 4, 4]]),
    }


def _greedy_without_cache(model: Ovis2_5, prompts: dict, steps: int, eos: tuple[int, ...], min_new: int = 0,
                          stop_at_eos: bool = True) -> torch.Tensor:
    """Reference: recompute the whole sequence every step and take the argmax of its last position
    (eos ids masked for the first `min_new` steps)."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    out = []
    with torch.no_grad():
        for step in range(steps):
            logits = model(ids, prompts["pixel_values"], prompts["grid_thws"], attention_mask=mask).logits[:, -1]
            if step < min_new:
                logits[:, list(eos)] = float("-inf")
            token = torch.where(finished, torch.tensor(PAD), logits.argmax(-1))
            out.append(token)
            if stop_at_eos:
                finished |= torch.isin(token, torch.tensor(eos))
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(out, dim=1)


def _config(**kwargs) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 8, "eos_token_ids": (511,), "pad_token_id": PAD, **kwargs})


def test_greedy_equals_argmax_recomputed_without_cache(model: Ovis2_5, prompts: dict) -> None:
    got = model.generate(**prompts, config=_config())
    assert got.shape == (2, 8)
    assert torch.equal(got, _greedy_without_cache(model, prompts, 8, eos=(511,)))


def test_rows_stop_at_eos_and_then_emit_pad(model: Ovis2_5, prompts: dict) -> None:
    free = model.generate(**prompts, config=_config())
    eos = int(free[0, 2])
    assert eos not in free[1].tolist() and eos not in free[0, :2].tolist(), "pick a prompt where this eos is unambiguous"
    got = model.generate(**prompts, config=_config(eos_token_ids=(eos,)))
    assert torch.equal(got[0, :3], free[0, :3])
    assert (got[0, 3:] == PAD).all()
    assert torch.equal(got[1], free[1])
    assert torch.equal(got, _greedy_without_cache(model, prompts, 8, eos=(eos,)))


def test_generation_ends_when_every_row_has_finished(model: Ovis2_5, prompts: dict) -> None:
    free = model.generate(**prompts, config=_config())
    got = model.generate(**prompts, config=_config(eos_token_ids=(int(free[0, 0]), int(free[1, 0]))))
    assert torch.equal(got, free[:, :1])


def test_left_padding_does_not_change_a_row(model: Ovis2_5, prompts: dict) -> None:
    batch = model.generate(**prompts, config=_config())
    image_only = model.generate(prompts["input_ids"][:1], pixel_values=prompts["pixel_values"],
                                grid_thws=prompts["grid_thws"], config=_config())
    text_only = model.generate(prompts["input_ids"][1:, 4:], config=_config())
    assert torch.equal(batch[0], image_only[0])
    assert torch.equal(batch[1], text_only[0])


def test_right_padding_is_refused(model: Ovis2_5) -> None:
    with pytest.raises(ValueError, match=r"LEFT-padded.*\[1\]"):
        model.generate(torch.tensor([[5, 6, 7], [5, 6, PAD]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), config=_config())


def test_sampling_is_reproducible_with_a_seed(model: Ovis2_5, prompts: dict) -> None:
    sampling = _config(do_sample=True, temperature=1.5, max_new_tokens=12)
    first = model.generate(**prompts, config=sampling, seed=7)
    again = model.generate(**prompts, config=sampling, seed=7)
    other = model.generate(**prompts, config=sampling, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    top1 = model.generate(**prompts, config=_config(do_sample=True, top_k=1), seed=3)
    assert torch.equal(top1, model.generate(**prompts, config=_config()))


@pytest.mark.parametrize(
    "settings",
    [
        dict(repetition_penalty=1.3),
        dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.05),
        dict(do_sample=True, top_p=0.5),
        dict(do_sample=True, top_k=3),
    ],
)
def test_logit_processing_follows_transformers(settings: dict) -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 50, generator=gen) * 3
    history = torch.randint(0, 50, (3, 6), generator=gen)
    generated = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    config = _config(**settings)
    expected = logits.clone()
    if config.repetition_penalty != 1.0:
        expected = RepetitionPenaltyLogitsProcessor(config.repetition_penalty)(history, expected)
    if config.do_sample:
        for warper in (TemperatureLogitsWarper(config.temperature) if config.temperature != 1.0 else None,
                       TopKLogitsWarper(config.top_k) if config.top_k else None,
                       TopPLogitsWarper(config.top_p) if config.top_p < 1.0 else None):
            if warper is not None:
                expected = warper(history, expected)
    torch.testing.assert_close(process_logits(logits, generated, config), expected)


def test_thinking_budget_feeds_the_suffix_to_rows_still_thinking(model: Ovis2_5, prompts: dict) -> None:
    free = model.generate(**prompts, config=_config(max_new_tokens=10))
    think_end = int(free[1, 1])  # row 1 closes its thinking at step 1, before the budget
    assert think_end not in free[0, :3].tolist(), "pick a prompt where row 0 is still thinking at the budget"
    suffix = (101, 102, think_end)
    got = model.generate(**prompts, config=_config(max_new_tokens=10, thinking_budget=3, thinking_end_id=think_end,
                                                   budget_suffix_ids=suffix))
    assert torch.equal(got[1], free[1])
    assert torch.equal(got[0, :3], free[0, :3])
    assert got[0, 3:6].tolist() == list(suffix)
    # after the suffix, row 0 continues greedily from prompt + its thoughts + suffix
    extended = {**prompts, "input_ids": torch.cat([prompts["input_ids"][:1], got[:1, :6]], dim=1),
                "attention_mask": None}
    extended["attention_mask"] = torch.ones_like(extended["input_ids"])
    continuation = model.generate(**extended, config=_config(max_new_tokens=4))
    assert torch.equal(got[0, 6:], continuation[0])


HEADER = (300, 301)  # stand-ins for the ids of `<|im_start|>assistant`
THINK_START, THINK_END = 302, 303  # and of `<think>`, `</think>`


def test_thinking_closed_looks_after_the_last_assistant_header() -> None:
    config = _config(thinking_end_id=THINK_END, assistant_header_ids=HEADER)
    closed = [5, *HEADER, 7, THINK_START, 7, THINK_END, 7]
    assert thinking_closed(torch.tensor(closed), config)
    assert not thinking_closed(torch.tensor([5, *HEADER, 7, THINK_START, 7]), config)
    assert not thinking_closed(torch.tensor(closed + [9, *HEADER, 7]), config), "an earlier turn's </think>"
    assert not thinking_closed(torch.tensor([5, THINK_END, 7]), config), "no header: no answer begun"
    assert not thinking_closed(torch.tensor([HEADER[0]]), config)


def test_a_prompt_with_an_empty_think_block_gets_no_budget_suffix(model: Ovis2_5) -> None:
    """Non-thinking prompts end with `<think>\\n\\n</think>\\n\\n`: the answer must never be cut."""
    answer_only = [11, 12, *HEADER, 5, THINK_START, 5, 5, THINK_END, 5, 5]
    thinking = [11, THINK_END, 12, *HEADER, 5, THINK_START, 5]  # a </think> of an earlier turn does not count
    width = len(answer_only)
    prompts = {
        "input_ids": torch.tensor([answer_only, [PAD] * (width - len(thinking)) + thinking]),
        "attention_mask": torch.tensor([[1] * width, [0] * (width - len(thinking)) + [1] * len(thinking)]),
        "pixel_values": None,
        "grid_thws": None,
    }
    free = model.generate(**prompts, config=_config(max_new_tokens=10))
    assert THINK_END not in free[:, :3].flatten().tolist(), "no row may close its thinking by itself here"
    suffix = (101, 102, THINK_END)
    got = model.generate(**prompts, config=_config(max_new_tokens=10, thinking_budget=3, thinking_end_id=THINK_END,
                                                   budget_suffix_ids=suffix, assistant_header_ids=HEADER))
    assert torch.equal(got[0], free[0])
    assert got[1, 3:6].tolist() == list(suffix)


def test_thinking_budget_needs_a_suffix(model: Ovis2_5, prompts: dict) -> None:
    with pytest.raises(ValueError, match="budget_suffix_ids"):
        model.generate(**prompts, config=_config(thinking_budget=4))
    with pytest.raises(ValueError, match="assistant_header_ids"):
        _config(thinking_budget=4, budget_suffix_ids=(1,), assistant_header_ids=()).validate()


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(do_sample=True, temperature=0.0), dict(top_p=0.0),
                                 dict(top_k=-1), dict(repetition_penalty=0.0), dict(eos_token_ids=())])
def test_invalid_settings_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        _config(**bad).validate()


def test_min_new_tokens_masks_eos_until_reached(model: Ovis2_5, prompts: dict) -> None:
    free = model.generate(**prompts, config=_config())
    eos = (int(free[0, 1]), int(free[1, 0]))
    got = model.generate(**prompts, config=_config(eos_token_ids=eos, min_new_tokens=4))
    assert not torch.isin(got[:, :4], torch.tensor(eos)).any()
    assert torch.equal(got, _greedy_without_cache(model, prompts, 8, eos=eos, min_new=4))
    after_one = model.generate(**prompts, config=_config(eos_token_ids=eos[:1], min_new_tokens=1))
    assert int(after_one[0, 1]) == eos[0] and (after_one[0, 2:] == PAD).all(), "eos is allowed once min_new is reached"


def test_ignore_eos_generates_every_token(model: Ovis2_5, prompts: dict) -> None:
    free = model.generate(**prompts, config=_config())
    eos = (int(free[0, 1]), int(free[1, 0]))
    got = model.generate(**prompts, config=_config(eos_token_ids=eos, ignore_eos=True))
    assert got.shape == (2, 8)
    assert torch.equal(got, free)
    assert torch.equal(got, _greedy_without_cache(model, prompts, 8, eos=eos, stop_at_eos=False))


def test_min_new_tokens_cannot_exceed_max_new_tokens() -> None:
    with pytest.raises(ValueError, match="min_new_tokens"):
        _config(min_new_tokens=9).validate()


def test_uniform_draws_are_uniform_and_keyed() -> None:
    keys = torch.arange(20000)
    draws = uniform_draws(3, keys, torch.tensor(0))
    assert ((draws >= 0) & (draws < 1)).all()
    counts = torch.histc(draws, bins=10, min=0, max=1)
    expected = 2000
    assert ((counts - expected).abs() < 4 * expected ** 0.5).all(), counts  # 4 sigma
    assert torch.equal(draws, uniform_draws(3, keys, torch.tensor(0)))
    others = [uniform_draws(4, keys, torch.tensor(0)), uniform_draws(3, keys, torch.tensor(1)),
              uniform_draws(3, keys + 1, torch.tensor(0))]
    for other in others:
        assert abs(float(torch.corrcoef(torch.stack([draws, other]))[0, 1])) < 0.05
    big = uniform_draws(2**40, torch.tensor([2**40, 2**40 + 1]), torch.tensor(7))
    assert big[0] != big[1]


def test_sampled_frequencies_follow_the_probabilities() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    rows = 20000
    logits = probs.log().expand(rows, -1)
    config = _config(do_sample=True)
    tokens = choose_tokens(logits, config, seed=9, row_keys=torch.arange(rows), step=torch.tensor(2))
    counts = torch.bincount(tokens, minlength=5).double()
    sigma = (rows * probs * (1 - probs)).sqrt()
    assert counts[1] == 0, "a token of zero probability is never drawn"
    assert ((counts - rows * probs).abs() <= 4 * sigma + 1).all(), counts
