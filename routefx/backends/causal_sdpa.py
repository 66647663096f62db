"""Masked SDPA that takes the causal kernel when the mask is the causal triangle (a run-time check).

Why. A Hugging Face model captured by torch.export builds its attention mask as a boolean tensor (`causal &
padding`, [B, 1, S, S]) even when no token is padded, and calls SDPA with it; the model run by Hugging Face
itself passes no mask and `is_causal=True` when nothing is padded. On CUDA, SDPA with a mask runs cuDNN's kernel
over every one of the S × S scores (3.48 ms of HF torch.compile's 14.6 ms forward on an H200, 8-layer d=2048
Llama at 4 × 2048, bench/RESULTS_GPU.md); with `is_causal` the flash kernels skip the upper triangle. On CPU
the difference is small (Intel Xeon, one thread, 16 heads of 64, S = 512: masked 8.7 ms, causal 7.9 ms).
Off by default on both backends that have it (`prepare(..., causal_check=True)` of the inductor and triton
backends); not yet measured on a GPU.

What. `causal_sdpa_(gm)` rewrites each `aten.scaled_dot_product_attention` with a boolean mask (no dropout, no
`is_causal`) as `routefx::sdpa_causal_if(q, k, v, mask, flag, scale, enable_gqa)`, with one
`routefx::mask_is_causal(mask)` per mask node (the layers share it): the flag is True when the query and key
lengths are equal and every row of the mask (every batch row and head) equals the lower triangle, so
`is_causal=True` computes exactly what the mask asks for; otherwise the call is the masked SDPA as captured
(padding, a sliding window shorter than the sequence, a decode step over a cache). The check is one comparison
over the mask, once per forward; its result is a host value, read on CUDA by one synchronisation (so it is not
used under CUDA graphs). Both are opaque custom ops, which Inductor calls as extern kernels (SDPA is one there
anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from routefx.ir.graph_utils import replace_node

__all__ = ["causal_sdpa_", "mask_is_causal", "sdpa_causal_if", "sdpa_parts", "rewrite_masked_sdpa"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


@torch.library.custom_op("routefx::mask_is_causal", mutates_args=())
def mask_is_causal(mask: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on the CPU: the boolean `mask` (..., Sq, Skv) is the causal lower triangle in every
    leading position, with Sq == Skv."""
    sq, skv = mask.shape[-2], mask.shape[-1]
    if sq != skv or sq < 2:
        return torch.tensor(False)
    tri = torch.ones(sq, skv, dtype=torch.bool, device=mask.device).tril()
    return torch.tensor(bool(torch.equal(mask, tri.expand(mask.shape))))


@mask_is_causal.register_fake
def _(mask):
    return torch.empty((), dtype=torch.bool)


@torch.library.custom_op("routefx::sdpa_causal_if", mutates_args=())
def sdpa_causal_if(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: torch.Tensor,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA(q, k, v, attn_mask=mask), computed with `is_causal=True` and no mask when `causal` (from
    `mask_is_causal(mask)`) says that is the same."""
    if bool(causal):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()  # the two kernels lay their outputs out differently; the op promises one layout


@sdpa_causal_if.register_fake
def _(q, k, v, mask, causal, scale=None, enable_gqa=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def sdpa_parts(n: fx.Node):
    """(q, k, v, mask, scale, enable_gqa) of an SDPA node with a boolean mask, no dropout and no `is_causal`,
    or None (any other SDPA)."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, n.args))
    a.update(n.kwargs)
    mask = a.get("attn_mask")
    if set(a) - set(names) or a.get("dropout_p", 0.0) or a.get("is_causal", False) or not isinstance(mask, fx.Node):
        return None
    mv = mask.meta.get("val")
    if mv is None or mv.dtype != torch.bool:
        return None
    return a["query"], a["key"], a["value"], mask, a.get("scale"), bool(a.get("enable_gqa", False))


def rewrite_masked_sdpa(gm: fx.GraphModule, accept, shared_key, make_shared, make_call) -> int:
    """Replace each SDPA node that `accept(node)` takes (its `sdpa_parts`, or None) by `make_call(graph, parts,
    shared)`, where `shared = make_shared(graph, parts)` is made once per `shared_key(parts)`, before the first
    SDPA that needs it (the layers that share a mask share it). Returns how many were replaced."""
    g = gm.graph
    shared: dict = {}
    done = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not _SDPA:
            continue
        parts = accept(n)
        if parts is None:
            continue
        key = shared_key(parts)
        with g.inserting_before(n):
            if key not in shared:
                shared[key] = make_shared(g, parts)
            rep = make_call(g, parts, shared[key])
        replace_node(n, rep)
        done += 1
    if done:
        g.lint()
        gm.recompile()
    return done


def causal_sdpa_(gm: fx.GraphModule) -> int:
    """Rewrite each SDPA with a boolean mask as `sdpa_causal_if` (module docstring); returns how many."""
    return rewrite_masked_sdpa(
        gm, sdpa_parts, shared_key=lambda p: p[3],
        make_shared=lambda g, p: g.call_function(torch.ops.routefx.mask_is_causal.default, (p[3],)),
        make_call=lambda g, p, flag: g.call_function(torch.ops.routefx.sdpa_causal_if.default, (*p[:4], flag, *p[4:])))
