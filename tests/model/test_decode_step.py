"""StaticDecoder's attended lengths and the choice of decode attention per device."""

from __future__ import annotations

import pytest
import torch

from litovis.model.decode_step import StaticDecoder, resolve_decode_attention
from litovis.model.decoding import DecodeOptions
from litovis.model.generation import GenerationConfig
from litovis.model.ovis import Ovis2_5
from litovis.model.split_kv_decoding import split_kv_available

CPU = torch.device("cpu")


def test_attended_lengths_cover_every_position(tiny_model_f64: Ovis2_5) -> None:
    options = DecodeOptions(attend_multiple=16, cuda_graphs=False)
    config = GenerationConfig(max_new_tokens=9, eos_token_ids=(511,), pad_token_id=0)
    decoder = StaticDecoder(tiny_model_f64, config, 2, 40, options)
    assert decoder.lengths == [16, 32, 40]
    assert [decoder.length_for(p) for p in (0, 15, 16, 31, 32, 39)] == [16, 16, 32, 32, 40, 40]
    assert set(decoder.splits) == set(decoder.lengths) and all(n >= 1 for n in decoder.splits.values())


def test_auto_decode_attention_is_split_kv_only_where_the_kernel_runs() -> None:
    assert resolve_decode_attention("auto", CPU) == ("split_kv" if split_kv_available(CPU) else "sdpa")
    assert resolve_decode_attention("matmul", CPU) == "matmul"
    with pytest.raises(ValueError, match="decode_attention must be auto or one of sdpa, matmul, split_kv"):
        resolve_decode_attention("flash", CPU)


@pytest.mark.skipif(split_kv_available(CPU), reason="the interpreter runs the kernel on CPU")
def test_explicit_split_kv_without_the_kernel_raises() -> None:
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA device"):
        resolve_decode_attention("split_kv", CPU)
