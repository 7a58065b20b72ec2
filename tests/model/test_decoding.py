"""The fast generator (packed prefill + static decode step) against the eager reference generator."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from litovis.model.checkpoint import build_ovis
from litovis.model.decode_step import StaticDecoder, decode_logits
from litovis.model.decoding import (
    DecodeOptions,
    EncodedPrompt,
    FastGenerator,
    bucket_size,
    check_prompt,
    packed_prefill,
    stage_prefill,
)
from litovis.model.generation import GenerationConfig, generate
from litovis.model.ovis import Ovis2_5
from litovis.model.presets import preset
from litovis.model.qwen3 import apply_rotary, rotary_cos_sin
from litovis.model.row_kv_cache import RowKVCache
from litovis.model.scheduling import BatchBudget, plan_batches

PAD = 0


def make_prompt(gen: torch.Generator, before: int, grids: list[tuple[int, int, int]] = (), after: int = 0) -> EncodedPrompt:
    """`before` text ids, one visual span per grid, `after` text ids; random pixels for the images."""
    ids = torch.randint(1, 500, (before,), generator=gen).tolist()
    patches = 0
    for t, h, w in grids:
        ids += [-301] + [-300] * (t * h * w // 4) + [-302]
        patches += t * h * w
    ids += torch.randint(1, 500, (after,), generator=gen).tolist()
    if not grids:
        return EncodedPrompt(torch.tensor(ids))
    pixels = torch.rand(patches, 768, generator=gen, dtype=torch.float64) * 2 - 1
    return EncodedPrompt(torch.tensor(ids), pixels, torch.tensor(grids))


@pytest.fixture(scope="module")
def prompts() -> list[EncodedPrompt]:
    """Ragged prompts: two images in one, one image in another, text only, a one-token prompt."""
    gen = torch.Generator().manual_seed(1)
    return [
        make_prompt(gen, 3, [(1, 4, 4), (1, 2, 6)], 4),
        make_prompt(gen, 9),
        make_prompt(gen, 2, [(1, 4, 2)], 1),
        make_prompt(gen, 1),
        make_prompt(gen, 17),
    ]


def reference(model: Ovis2_5, prompts: list[EncodedPrompt], config: GenerationConfig,
              row_keys: list[int] | None = None) -> torch.Tensor:
    """The eager reference generator over the prompts left-padded into one batch."""
    longest = max(p.input_ids.numel() for p in prompts)
    ids = torch.full((len(prompts), longest), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - prompt.input_ids.numel():] = prompt.input_ids
        mask[row, longest - prompt.input_ids.numel():] = 1
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    grids = [p.grid_thws for p in prompts if p.grid_thws is not None]
    keys = None if row_keys is None else torch.tensor(row_keys)
    return generate(model, ids, mask, torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None,
                    config, keys)


def pad_results(results: list[torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """Results as one `[N, n]` tensor padded with `pad_token_id` (the reference generator's shape)."""
    width = max((r.numel() for r in results), default=0)
    out = torch.full((len(results), width), pad_token_id, dtype=torch.long)
    for i, tokens in enumerate(results):
        out[i, : tokens.numel()] = tokens
    return out


def fast(model: Ovis2_5, prompts: list[EncodedPrompt], config: GenerationConfig, options: DecodeOptions | None = None,
         row_keys: list[int] | None = None) -> torch.Tensor:
    return pad_results(FastGenerator(model, config, options).generate(prompts, row_keys), config.pad_token_id)


def _config(**kwargs) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": 9, "eos_token_ids": (511,), "pad_token_id": PAD, **kwargs})


# Chunks of at most 12 prompt tokens (the 23-token prompt runs alone), 5 rows padded to 8, a cache
# length rounded to 16, decode steps attending over 4, 8, 12... slots as positions advance.
SMALL_CHUNKS = DecodeOptions(max_prefill_tokens=12, batch_buckets=(2, 8), cache_multiple=16, attend_multiple=4)


@pytest.mark.parametrize("options", [DecodeOptions(), SMALL_CHUNKS, DecodeOptions(decode_attention="matmul")],
                         ids=["one-chunk", "chunked-bucketed", "matmul-attention"])
def test_greedy_equals_the_reference(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt], options: DecodeOptions) -> None:
    expected = reference(tiny_model_f64, prompts, _config())
    assert expected.shape == (5, 9)
    assert torch.equal(fast(tiny_model_f64, prompts, _config(), options), expected)


def test_rows_finishing_at_different_steps(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt]) -> None:
    free = reference(tiny_model_f64, prompts, _config())
    eos = int(free[0, 2])
    config = _config(eos_token_ids=(eos, int(free[1, 5])))
    expected = reference(tiny_model_f64, prompts, config)
    finished_at = [(row != PAD).sum().item() for row in expected]
    assert len(set(finished_at)) > 1, "the chosen eos ids must stop rows at different steps"
    for sync_every in (0, 1, 4):
        got = fast(tiny_model_f64, prompts, config, dataclasses.replace(SMALL_CHUNKS, sync_every=sync_every))
        assert torch.equal(got, expected), f"sync_every={sync_every}"


def test_decoding_stops_soon_after_every_row_has_finished(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt]) -> None:
    free = reference(tiny_model_f64, prompts, _config())
    config = _config(eos_token_ids=tuple(int(t) for t in free[:, 0]), max_new_tokens=40)
    generator = FastGenerator(tiny_model_f64, config, DecodeOptions(sync_every=4))
    got = generator.generate(prompts)
    assert [t.tolist() for t in got] == [[int(t)] for t in free[:, 0]]
    assert generator.decode_steps == 3  # steps 1..3 ran; the check before step 4 saw every row finished


@pytest.mark.parametrize("settings", [
    dict(do_sample=True, temperature=1.5, seed=11),
    dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5),
    dict(repetition_penalty=1.5),
])
def test_sampling_and_penalty_equal_the_reference(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt],
                                                  settings: dict) -> None:
    config = _config(max_new_tokens=12, **settings)
    keys = [40, 3, 17, 8, 1000]
    expected = reference(tiny_model_f64, prompts, config, keys)
    assert torch.equal(fast(tiny_model_f64, prompts, config, SMALL_CHUNKS, keys), expected)


def test_thinking_budget_equals_the_reference(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt]) -> None:
    free = reference(tiny_model_f64, prompts, _config())
    config = _config(max_new_tokens=10, thinking_budget=3, thinking_end_id=int(free[1, 1]),
                     budget_suffix_ids=(101, 102, int(free[1, 1])))
    expected = reference(tiny_model_f64, prompts, config)
    assert expected[0, 3:6].tolist() == [101, 102, int(free[1, 1])]
    assert torch.equal(fast(tiny_model_f64, prompts, config, SMALL_CHUNKS), expected)


def test_a_prompt_that_closed_its_thinking_gets_no_budget_suffix(tiny_model_f64: Ovis2_5,
                                                                   prompts: list[EncodedPrompt]) -> None:
    header, think_start, think_end = (300, 301), 302, 303
    tail = {"non-thinking": [*header, 5, think_start, 5, 5, think_end, 5, 5], "thinking": [*header, 5, think_start, 5]}
    chats = [EncodedPrompt(torch.cat([p.input_ids, torch.tensor(tail["non-thinking" if i % 2 else "thinking"])]),
                           p.pixel_values, p.grid_thws) for i, p in enumerate(prompts)]
    free = fast(tiny_model_f64, chats, _config(max_new_tokens=10), SMALL_CHUNKS)
    assert think_end not in free[:, :3].flatten().tolist(), "no row may close its thinking by itself here"
    suffix = (101, 102, think_end)
    config = _config(max_new_tokens=10, thinking_budget=3, thinking_end_id=think_end, budget_suffix_ids=suffix,
                     assistant_header_ids=header)
    got = fast(tiny_model_f64, chats, config, SMALL_CHUNKS)
    assert torch.equal(got, reference(tiny_model_f64, chats, config))
    for row in range(len(chats)):
        if row % 2:
            assert torch.equal(got[row], free[row]), row
        else:
            assert got[row, 3:6].tolist() == list(suffix), row


@pytest.mark.parametrize("settings", [dict(min_new_tokens=6), dict(ignore_eos=True)])
def test_forced_lengths_equal_the_reference(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt], settings: dict) -> None:
    free = reference(tiny_model_f64, prompts, _config())
    config = _config(eos_token_ids=(int(free[0, 1]), int(free[2, 0])), **settings)
    expected = reference(tiny_model_f64, prompts, config)
    assert torch.equal(fast(tiny_model_f64, prompts, config, SMALL_CHUNKS), expected)


def test_a_reused_decoder_gives_what_a_fresh_one_gives(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt]) -> None:
    generator = FastGenerator(tiny_model_f64, _config(), SMALL_CHUNKS)
    first = pad_results(generator.generate(prompts[:4]), PAD)
    decoder = generator._decoder
    second = pad_results(generator.generate(prompts[1:]), PAD)  # same bucket and cache length
    assert generator._decoder is decoder
    assert torch.equal(first, reference(tiny_model_f64, prompts[:4], _config()))
    assert torch.equal(second, reference(tiny_model_f64, prompts[1:], _config()))


def test_a_decoder_with_a_longer_cache_serves_shorter_batches(tiny_model_f64: Ovis2_5,
                                                              prompts: list[EncodedPrompt]) -> None:
    """Batches come longest first: a later batch that fits in the cache reuses the decoder (and its
    graphs); one that does not gets a new decoder."""
    generator = FastGenerator(tiny_model_f64, _config(), SMALL_CHUNKS)
    longest, short, long_again = [prompts[0], prompts[4]], [prompts[3], prompts[2]], [prompts[4], prompts[1]]
    first = pad_results(generator.generate(longest), PAD)
    decoder = generator._decoder
    second = pad_results(generator.generate(short), PAD)  # cache of 16 slots would do; 32 are there
    assert generator._decoder is decoder
    generator.generate([make_prompt(torch.Generator().manual_seed(2), 40), prompts[1]])
    assert generator._decoder is not decoder
    third = pad_results(generator.generate(long_again), PAD)
    for got, batch in ((first, longest), (second, short), (third, long_again)):
        assert torch.equal(got, reference(tiny_model_f64, batch, _config()))


def _alone(model: Ovis2_5, prompt: EncodedPrompt, config: GenerationConfig, key: int) -> list[int]:
    """The eager reference on one prompt, trimmed after its eos."""
    out = generate(model, prompt.input_ids[None], None, prompt.pixel_values, prompt.grid_thws, config,
                   torch.tensor([key]))[0].tolist()
    for step, token in enumerate(out):
        if token in config.eos_token_ids:
            return out[: step + 1]
    return out


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, temperature=1.3, top_p=0.95, seed=21)])
def test_planned_batches_give_each_row_what_it_gets_alone(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt],
                                                          settings: dict) -> None:
    config = _config(max_new_tokens=7, **settings)
    generator = FastGenerator(tiny_model_f64, config, DecodeOptions(max_prefill_tokens=20))
    batches = plan_batches([p.input_ids.numel() for p in prompts], BatchBudget(2, 40))
    assert len(batches) > 2
    for batch in batches:
        outputs = generator.generate([prompts[i] for i in batch], row_keys=batch)
        for index, tokens in zip(batch, outputs, strict=True):
            assert tokens.tolist() == _alone(tiny_model_f64, prompts[index], config, index), index


def _by_row(generator: FastGenerator, prompts: list[EncodedPrompt], batches: list[list[int]]) -> dict[int, list[int]]:
    tokens = {}
    for batch in batches:
        for index, row in zip(batch, generator.generate([prompts[i] for i in batch], row_keys=batch), strict=True):
            tokens[index] = row.tolist()
    return tokens


def test_a_rows_tokens_do_not_depend_on_its_batch(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt]) -> None:
    config = _config(do_sample=True, temperature=1.5, seed=4, max_new_tokens=6)
    one_by_one = _by_row(FastGenerator(tiny_model_f64, config, SMALL_CHUNKS), prompts, [[i] for i in range(len(prompts))])
    all_at_once = _by_row(FastGenerator(tiny_model_f64, config, SMALL_CHUNKS), prompts, [list(range(len(prompts)))])
    assert one_by_one == all_at_once


def test_a_batch_out_of_gpu_memory_is_generated_in_halves(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Decoders of more than 2 rows 'run out of memory': the batch is split, rows keep their
    tokens (sampling included), and the same batch again is split up front, without a retry."""
    config = _config(do_sample=True, temperature=1.5, seed=4, max_new_tokens=6)
    options = dataclasses.replace(SMALL_CHUNKS, batch_buckets=(1, 2, 4, 8))
    expected = fast(tiny_model_f64, prompts, config, options)
    real_init, failures = StaticDecoder.__init__, []

    def init(self, model, config, batch, max_len, options) -> None:
        if batch > 2:
            failures.append(batch)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        real_init(self, model, config, batch, max_len, options)

    monkeypatch.setattr(StaticDecoder, "__init__", init)
    generator = FastGenerator(tiny_model_f64, config, options)
    with caplog.at_level("WARNING", logger="litovis.model.decoding"):
        first = pad_results(generator.generate(prompts), config.pad_token_id)
    assert torch.equal(first, expected)
    assert failures and "ran out of GPU memory; generating it in halves" in caplog.text
    tried = len(failures)
    again = pad_results(generator.generate(prompts), config.pad_token_id)
    assert torch.equal(again, expected) and len(failures) == tried


def test_an_unset_seed_is_drawn_once_per_generator(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt]) -> None:
    """With seed=None each batch shape gets its own selector; they must all share one seed."""
    config = _config(do_sample=True, temperature=1.5, seed=None, max_new_tokens=6)
    generator = FastGenerator(tiny_model_f64, config, SMALL_CHUNKS)
    all_at_once = _by_row(generator, prompts, [list(range(len(prompts)))])
    shapes = _by_row(generator, prompts, [[0], [1, 2], [3, 4]])  # 2 rows instead of 8, shorter caches
    assert shapes == all_at_once
    again = _by_row(FastGenerator(tiny_model_f64, config, SMALL_CHUNKS), prompts, [list(range(len(prompts)))])
    assert again != all_at_once, "another generator draws another seed"


def test_packed_prefill_logits_and_cache_equal_per_prompt_forwards(tiny_model_f64: Ovis2_5,
                                                                    prompts: list[EncodedPrompt]) -> None:
    llm = tiny_model_f64.llm
    cache = RowKVCache(llm.config, 6, 32, torch.float64, torch.device("cpu"))
    rows = [5, 0, 2]
    chosen = [prompts[0], prompts[1], prompts[2]]
    with torch.no_grad():
        logits = packed_prefill(tiny_model_f64, chosen, cache, rows)
        for row, prompt, got in zip(rows, chosen, logits, strict=True):
            alone = tiny_model_f64(prompt.input_ids[None], prompt.pixel_values, prompt.grid_thws).logits[0, -1]
            torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)
            # keys of layer 0 at slot p = k_norm(k_proj(norm(embedding))) rotated to position p
            attn = llm.model.layers[0].self_attn
            embeds = tiny_model_f64.merge_multimodal(prompt.input_ids[None], prompt.pixel_values, prompt.grid_thws)
            length = prompt.input_ids.numel()
            heads, dim = llm.config.num_key_value_heads, llm.config.head_dim
            k = attn.k_norm(attn.k_proj(llm.model.layers[0].input_layernorm(embeds)).view(1, length, heads, dim))
            cos, sin = rotary_cos_sin(torch.arange(length)[None], dim, llm.config.rope_theta, torch.float64)
            expected_k = apply_rotary(k, cos, sin)[0].transpose(0, 1)
            torch.testing.assert_close(cache.keys[0][row, :, :length], expected_k, rtol=1e-10, atol=1e-10)
    assert (cache.keys[0][[1, 3, 4]] == 0).all(), "rows not in the prefill stay untouched"


@pytest.mark.parametrize("prefix", [False, True], ids=["whole-cache", "cache-prefix"])
@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_one_decode_step_equals_the_forward_of_the_extended_prompt(tiny_model_f64: Ovis2_5,
                                                                   prompts: list[EncodedPrompt], attention: str,
                                                                   prefix: bool) -> None:
    """The captured function itself, eagerly: its logits are the full forward's last logits, whether
    it attends over the whole cache or only over the slots up to the furthest position."""
    llm = tiny_model_f64.llm
    cache = RowKVCache(llm.config, 3, 40, torch.float64, torch.device("cpu"))
    chosen = [prompts[4], prompts[0], prompts[3]]
    lengths = torch.tensor([p.input_ids.numel() for p in chosen])
    new = torch.tensor([7, 300, 42])
    length = int(lengths.max()) + 1 if prefix else None
    with torch.no_grad():
        packed_prefill(tiny_model_f64, chosen, cache, [0, 1, 2])
        logits = decode_logits(llm, cache, new, lengths.clone(), torch.arange(3), torch.arange(40), attention, length)
        # the new keys landed in the cache itself, at each row's position
        assert all(cache.keys[0][row, :, int(lengths[row])].abs().sum() > 0 for row in range(3))
        for row, prompt in enumerate(chosen):
            ids = torch.cat([prompt.input_ids, new[row:row + 1]])[None]
            expected = tiny_model_f64(ids, prompt.pixel_values, prompt.grid_thws).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-10, atol=1e-10)


def test_mismatched_images_name_the_prompt(tiny_model_f64: Ovis2_5, prompts: list[EncodedPrompt]) -> None:
    broken = dataclasses.replace(prompts[2], grid_thws=torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"prompt 1: 1 image spans with 2 visual atoms.*1 images with 4 atoms"):
        FastGenerator(tiny_model_f64, _config()).generate([prompts[1], broken])
    with pytest.raises(ValueError, match="prompt 0: pixel_values and grid_thws go together"):
        check_prompt(dataclasses.replace(prompts[2], pixel_values=None), 0)
    with pytest.raises(ValueError, match="prompt 3: input_ids must be a non-empty 1-D"):
        check_prompt(EncodedPrompt(torch.tensor([], dtype=torch.long)), 3)


def test_bucket_size() -> None:
    assert bucket_size(5, (2, 8, 16)) == 8
    assert bucket_size(8, (2, 8, 16)) == 8
    assert bucket_size(1, (2, 8, 16)) == 2
    assert bucket_size(17, (2, 8, 16)) == 17


@pytest.mark.parametrize("bad", [dict(max_prefill_tokens=0), dict(batch_buckets=()), dict(cache_multiple=0),
                                 dict(attend_multiple=0), dict(sync_every=-1), dict(decode_attention="flash")])
def test_invalid_options_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        DecodeOptions(**bad).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager_decoding(prompts: list[EncodedPrompt]) -> None:
    from litovis.model.checkpoint import build_ovis
    from litovis.model.presets import preset

    torch.manual_seed(0)
    model = build_ovis(preset("tiny"), dtype=torch.float32, device="cuda").eval()
    moved = [EncodedPrompt(p.input_ids, None if p.pixel_values is None else p.pixel_values.float(), p.grid_thws)
             for p in prompts]
    for config in (_config(max_new_tokens=20), _config(max_new_tokens=20, do_sample=True, top_p=0.8, seed=1,
                                                          repetition_penalty=1.2, min_new_tokens=4)):
        for attention in ("sdpa", "matmul"):
            options = dataclasses.replace(SMALL_CHUNKS, decode_attention=attention)
            eager = fast(model, moved, config, dataclasses.replace(options, cuda_graphs=False))
            graphed = fast(model, moved, config, options)
            assert torch.equal(graphed, eager), attention


def test_compiled_layers_are_not_recompiled_per_layer(prompts: list[EncodedPrompt]) -> None:
    """Layers share one compiled graph per phase: a layer gets its own cache view, not an index that
    dynamo would specialise on (36 layers would pass its recompile limit and fall back to eager)."""
    torch._dynamo.reset()
    config = preset("tiny")
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, num_hidden_layers=6))
    torch.manual_seed(0)
    model = build_ovis(config, dtype=torch.float64).eval()
    expected = fast(model, prompts, _config())
    for layer in model.llm.model.layers:
        layer.compile(backend="eager", dynamic=False)
    torch._dynamo.utils.counters.clear()
    try:
        got = fast(model, prompts, _config())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, expected)
    # prefill chunks of a few shapes and one decode step; never one graph per layer
    assert 0 < graphs < 6, f"{graphs} graphs for 6 layers"


def test_staged_prefill_inputs_restart_positions_per_prompt_and_name_each_tokens_row(
        prompts: list[EncodedPrompt]) -> None:
    chosen = [prompts[1], prompts[0], prompts[3]]  # 9 text ids; 3 + 2 spans + 4; 1
    staged = stage_prefill(chosen, [5, 2, 7], torch.device("cpu"))
    lengths = [p.input_ids.numel() for p in chosen]
    assert staged.cu_seqlens.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert staged.positions.tolist() == [i for n in lengths for i in range(n)]
    assert staged.rows.tolist() == [5] * lengths[0] + [2] * lengths[1] + [7]
    assert torch.equal(staged.ids, torch.cat([p.input_ids for p in chosen]))
    assert torch.equal(staged.pixels, prompts[0].pixel_values) and torch.equal(staged.grids, prompts[0].grid_thws)
    assert staged.longest == max(lengths)
    assert stage_prefill(chosen[:1], [0], torch.device("cpu")).pixels is None
