"""transformers' plain `generate` as the baseline of bench/predict.py: same LLM weights, SDPA.

`transformers_llm` builds transformers' `Qwen3ForCausalLM` from our LLM's config on the meta
device and assigns OUR weight tensors to it (no copy: equal compute, no extra memory);
`run_transformers` times greedy `generate` with a forced number of new tokens; `agreement`
compares its tokens with ours. Imported by bench/predict.py, not run on its own.
"""

from __future__ import annotations

import time

import torch


def transformers_llm(model, device: torch.device):
    """transformers' Qwen3ForCausalLM from our LLM config, sharing our LLM's weight tensors (SDPA)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = model.llm.config
    hf_config = Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, use_sliding_window=False, attn_implementation="sdpa",
    )
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(model.llm.state_dict(), strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto transformers' Qwen3: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_config).to(device)
    left = [name for name, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model left on the meta device: {left}")
    return hf.eval()


@torch.no_grad()
def run_transformers(hf, batch: int, text_ids: torch.Tensor, new_tokens: int, eos: tuple[int, int],
                     device: torch.device) -> tuple[list[float], int, float | None, torch.Tensor]:
    """Time transformers' generate over `text_ids` `[rows, tokens]` in batches of `batch` rows (eos
    ids: stop, pad). Returns the seconds per batch, the new tokens produced, the peak GiB allocated
    and the new tokens of the first batch (for agreement)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, tokens = text_ids.shape
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=eos[1],
                  eos_token_id=list(eos))
    seconds, produced, first = [], 0, None
    for start in range(0, rows, batch):
        ids = text_ids[start:start + batch].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - began)
        produced += out[:, tokens:].numel()
        if first is None:
            first = out[:, tokens:].cpu()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, produced, peak, first


def agreement(ours: list[torch.Tensor], theirs: torch.Tensor) -> str:
    """Share of rows whose first new token, and whose every new token, equal transformers'."""
    ours = torch.stack(ours)
    same_first = (ours[:, 0] == theirs[:, 0]).float().mean().item()
    same_all = (ours == theirs).all(-1).float().mean().item()
    return f"first {same_first:.0%}, all {same_all:.0%}"
