"""Dataset generation: batch planning under budgets, results in input order, batch-independent rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from litovis.model.decoding import DecodeOptions, EncodedPrompt
from litovis.model.generation import GenerationConfig, generate
from litovis.model.ovis import Ovis2_5
from litovis.model.scheduling import BatchBudget, GenerationResult, generate_dataset, plan_batches

PAD = 0


@pytest.mark.parametrize("budget", [BatchBudget(3, 1000), BatchBudget(64, 40), BatchBudget(1, 1), BatchBudget(4, 25)])
def test_plans_cover_every_prompt_once_within_budgets(budget: BatchBudget) -> None:
    lengths = [5, 17, 3, 17, 9, 30, 1, 12, 8, 8, 50]
    batches = plan_batches(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    order = [i for batch in batches for i in batch]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True), "longest first"
    assert order == sorted(order, key=lambda i: (-lengths[i], i)), "ties keep input order"
    for batch in batches:
        assert len(batch) <= budget.max_batch_size
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget.max_batch_tokens or len(batch) == 1, "only a lone prompt may exceed the budget"


def test_plans_fill_batches_greedily() -> None:
    assert plan_batches([10, 10, 10, 10, 10], BatchBudget(2, 1000)) == [[0, 1], [2, 3], [4]]
    assert plan_batches([4, 9, 4, 4], BatchBudget(8, 18)) == [[1, 0], [2, 3]]
    assert plan_batches([], BatchBudget()) == []


def test_invalid_budget_raises() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        plan_batches([1], BatchBudget(0, 10))
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([1], BatchBudget(1, 0))


@pytest.fixture(scope="module")
def dataset() -> list[EncodedPrompt]:
    gen = torch.Generator().manual_seed(3)
    prompts = []
    for index, length in enumerate([6, 14, 3, 9, 14, 1, 11]):
        ids = torch.randint(1, 500, (length,), generator=gen)
        if index % 3 == 0:  # a 4-atom image in the middle of every third prompt
            ids = torch.cat([ids[:2], torch.tensor([-301, -300, -300, -300, -300, -302]), ids[2:]])
            pixels = torch.rand(16, 768, generator=gen, dtype=torch.float64)
            prompts.append(EncodedPrompt(ids, pixels, torch.tensor([[1, 4, 4]])))
        else:
            prompts.append(EncodedPrompt(ids))
    return prompts


def _alone(model: Ovis2_5, prompt: EncodedPrompt, config: GenerationConfig, key: int) -> list[int]:
    """The eager reference on one prompt, trimmed after its eos."""
    out = generate(model, prompt.input_ids[None], None, prompt.pixel_values, prompt.grid_thws, config,
                   torch.tensor([key]))[0].tolist()
    for step, token in enumerate(out):
        if token in config.eos_token_ids:
            return out[: step + 1]
    return out


CONFIG = GenerationConfig(max_new_tokens=7, eos_token_ids=(511,), pad_token_id=PAD)


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, temperature=1.3, top_p=0.95, seed=21)])
def test_results_come_in_input_order_and_equal_each_prompt_alone(tiny_model_f64: Ovis2_5, dataset: list[EncodedPrompt],
                                                                  settings: dict) -> None:
    config = dataclasses.replace(CONFIG, **settings)
    batches: list[list[int]] = []
    results = list(generate_dataset(tiny_model_f64, dataset, config, BatchBudget(3, 40),
                                    DecodeOptions(max_prefill_tokens=20), on_batch=batches.append))
    assert [r.index for r in results] == list(range(len(dataset)))
    assert batches == plan_batches([p.input_ids.numel() for p in dataset], BatchBudget(3, 40))
    assert len(batches) > 2
    for result, prompt in zip(results, dataset, strict=True):
        assert result.token_ids == _alone(tiny_model_f64, prompt, config, result.index)


def test_rows_do_not_depend_on_their_batch(tiny_model_f64: Ovis2_5, dataset: list[EncodedPrompt]) -> None:
    config = dataclasses.replace(CONFIG, do_sample=True, temperature=1.5, seed=4, max_new_tokens=10)
    one_by_one = list(generate_dataset(tiny_model_f64, dataset, config, BatchBudget(1, 1000)))
    all_at_once = list(generate_dataset(tiny_model_f64, dataset, config, BatchBudget(64, 1000)))
    assert one_by_one == all_at_once


def test_eos_stop_is_reported(tiny_model_f64: Ovis2_5, dataset: list[EncodedPrompt]) -> None:
    free = list(generate_dataset(tiny_model_f64, dataset, CONFIG))
    eos = free[1].token_ids[2]
    config = dataclasses.replace(CONFIG, eos_token_ids=(eos,))
    results = list(generate_dataset(tiny_model_f64, dataset, config))
    assert results[1] == GenerationResult(index=1, token_ids=free[1].token_ids[:3], stopped_at_eos=True)
    for result in results:
        assert result.stopped_at_eos == (eos in result.token_ids)
        assert result.stopped_at_eos or len(result.token_ids) == config.max_new_tokens


def test_a_bad_prompt_fails_before_any_work(tiny_model_f64: Ovis2_5, dataset: list[EncodedPrompt]) -> None:
    bad = dataset[:4] + [EncodedPrompt(torch.tensor([5, -301, -300, -302]))]
    batches: list[list[int]] = []
    with pytest.raises(ValueError, match="prompt 4: 1 image spans"):
        list(generate_dataset(tiny_model_f64, bad, CONFIG, on_batch=batches.append))
    assert batches == []
