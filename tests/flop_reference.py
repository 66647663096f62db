"""An independent FLOP reference: torch's FlopCounterMode on the model itself, plus closed forms for what it does
not count (CPU attention kernels and transformers' grouped expert GEMM), written here from the zoo configs."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Zoo families whose closed forms below are checked: attention through SDPA with heads x head_dim queries and
# values, causal for decoders, no sliding window; dense FFNs or grouped-GEMM MoE. A family with another attention
# (eager matmuls, MLA, soft-capping) needs its own closed form before it joins.
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "bert", "mixtral", "qwen2moe", "plain",
            "plain_parallel", "plain_sandwich", "plain_resized")


def heads(model) -> tuple[int, int]:
    """(attention heads, head dim) from the model's config (or the plain zoo model's attention module)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        att = model.z[0].a
        return att.h, att.b.in_features // att.h
    return cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _flop_count(model, args, kwargs) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fcm:
        model(*args, **kwargs)
    return sum(v for op, v in fcm.get_flop_counts()["Global"].items()
               if "attention" not in str(op) and "grouped_mm" not in str(op))


def _doubled(x):
    return torch.cat([x, x], 0) if isinstance(x, torch.Tensor) and x.dim() >= 1 else x


def counted_by_torch(model, entry, args, kwargs) -> float:
    """FLOPs FlopCounterMode counts in one forward for the matrix products other than attention kernels and
    grouped expert GEMMs (those two are left to the closed forms below, whether or not a torch release counts
    them), for the part that grows with the batch: the count at batch 2B minus the count at B. routefx counts per
    token; work done once per call whatever the batch (transformers 5.17 computes the rotary frequencies as one
    [1, d/2, 1] x [1, 1, S] product) is not per-token work."""
    kw = dict(kwargs, **({"use_cache": False} if hasattr(model, "config") and entry.expect.decoder else {}))
    once = _flop_count(model, args, kw)
    twice = _flop_count(model, tuple(_doubled(a) for a in args), {k: _doubled(v) for k, v in kw.items()})
    return twice - once


def uncounted_per_token(model, entry, seq: int, blocks=None) -> float:
    """Per-token FLOPs of attention scores (QKᵀ and PV; (S+1)/2 keys per query when causal) and of routed MoE
    experts (top_k experts per token, 3 products of d x F) in `blocks` (default: all)."""
    e = entry.expect
    blocks = range(e.blocks) if blocks is None else blocks
    n_heads, dh = heads(model)
    keys = (seq + 1) / 2 if e.decoder else seq
    total = 0.0
    for i in blocks:
        total += 2 * n_heads * keys * 2 * dh
        if e.kinds[i] == "moe":
            total += e.top_k * 2 * 3 * e.hidden * e.inter[i]
    return total
