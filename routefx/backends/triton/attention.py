"""Masked attention as block-sparse FlexAttention (triton backend).

Why. A Hugging Face model captured by torch.export builds its attention mask as a boolean tensor
(`causal & padding`, [B, 1, S, S]) whenever the graph is traced, even when no token is padded, and calls SDPA with
it. On CUDA, SDPA with a mask runs every one of the S × S scores (cuDNN's kernel reads the mask as a bias): an
H200 spent 3.48 ms of a 14.6 ms forward (Llama 8 layers, d=2048, batch 4 × 2048, bf16, HF torch.compile) in that
kernel, with half of the work on positions the causal mask removes, plus 0.7 ms preparing the mask.

What. Each `aten.scaled_dot_product_attention` whose mask is a boolean tensor becomes `flex_attention` with a
`BlockMask` computed from that same tensor on the GPU, once per mask (the layers that share a mask share it): the
mask is cut into 128 × 128 tiles; a tile with no allowed position is never computed, a tile where every position
is allowed runs without reading the mask, and only the others (the diagonal, padding edges) read it through the
mask function. Any boolean mask is handled this way (causal, padding, sliding window, bidirectional), because
the block structure is read from the mask's values, not from a pattern. No host synchronisation: the block
counts and indices are tensors of fixed shape (CUDA-graph capturable). Inductor compiles `flex_attention` into
its Triton template.

Status: EXPERIMENTAL, off by default (`prepare(..., flex_attention=True)` turns it on). Verified on CPU: eager
FlexAttention against SDPA, the block tensors against torch's `create_block_mask`, and the whole graph compiled
by Inductor (its CPU FlexAttention template) against the eager backend, on torch 2.11 and 2.13. On an H200
(torch 2.11, triton 3.6) the compiled graph failed with a CUDA illegal memory access
(bench/results/gpu_run_2243_h200_flex/cuda.log; the Dynamo error "Attempt to trace generator" logged first is
a side effect of the runtime error). That version let Inductor inline the mask's computation (index and compare
ops on `attention_mask`) into the template's mask function; Inductor's CPU template refuses exactly that, so
the mask is now materialised first (`materialize`). Not yet run on a GPU since: `bench/gpu_flex_probe.py`
checks each stage in its own process.

When (with the option on). For query and key lengths of at least
`MIN_LENGTH` (decided when Inductor traces the graph, per shape: shorter calls, decode steps among them, keep
SDPA), head sizes in `HEAD_DIMS`, no dropout, no `is_causal` flag. Elsewhere the SDPA node is left as it was.
Rows with no allowed key (left padding's pad queries) give zeros here where SDPA's kernels give zeros or NaN; they
are pad positions either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from routefx.backends.causal_sdpa import rewrite_masked_sdpa, sdpa_parts

__all__ = ["flex_attention_", "block_mask_tensors", "flex_sdpa", "BLOCK", "MIN_LENGTH", "HEAD_DIMS"]

aten = torch.ops.aten
BLOCK = 128                    # FlexAttention's default tile (queries and keys)
MIN_LENGTH = 2 * BLOCK         # shorter queries or keys keep SDPA (one tile: nothing to skip)
HEAD_DIMS = (32, 64, 128)      # head sizes FlexAttention's kernel is tuned for on Hopper


def _ceil(a, b):
    return (a + b - 1) // b


def _use_flex(q: torch.Tensor, k: torch.Tensor) -> bool:
    return q.shape[-2] >= MIN_LENGTH and k.shape[-2] >= MIN_LENGTH


def block_mask_tensors(mask: torch.Tensor, q_len, kv_len):
    """(mask, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices) of a boolean mask
    [Bm, Hm, q_len, kv_len] (Bm, Hm may be 1): the tiles of BLOCK × BLOCK with some but not all positions
    allowed (`kv_*`, which read the mask) and those with all allowed (`full_kv_*`), per query tile, indices
    first in ascending key order; the padding added to reach whole tiles counts as disallowed. The mask
    function reads the unpadded mask: FlexAttention's kernel bounds the indices of a partial last tile itself
    (and Inductor 2.11 cannot inline a padded tensor into its template)."""
    nq, nk = _ceil(q_len, BLOCK), _ceil(kv_len, BLOCK)
    mp = F.pad(mask, (0, nk * BLOCK - kv_len, 0, nq * BLOCK - q_len))  # pads with False
    tiles = mp.reshape(mp.shape[0], mp.shape[1], nq, BLOCK, nk, BLOCK)
    some = tiles.any(dim=5).any(dim=3)
    every = tiles.all(dim=5).all(dim=3)
    partial = some & ~every

    def counts_and_indices(sel):  # as torch's create_block_mask orders them (int32 keys, stable argsort)
        sel = sel.to(torch.int32)
        num = sel.sum(dim=-1).to(torch.int32, memory_format=torch.contiguous_format)
        idx = torch.argsort(sel, dim=-1, descending=True, stable=True)
        return num, idx.to(torch.int32, memory_format=torch.contiguous_format)

    kv_num, kv_idx = counts_and_indices(partial)
    full_num, full_idx = counts_and_indices(every)
    return mask, kv_num, kv_idx, full_num, full_idx


def flex_sdpa(q, k, v, mask, blocks, scale=None, enable_gqa=False):
    """SDPA(q, k, v, attn_mask=mask) as FlexAttention over `blocks` (from `mask_blocks`), or plain SDPA when
    `mask_blocks` found the lengths below MIN_LENGTH (then `blocks` is None)."""
    if blocks is None:
        return aten.scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=enable_gqa)
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    m, kv_num, kv_idx, full_num, full_idx = blocks
    per_batch, per_head = m.shape[0] > 1, m.shape[1] > 1

    def mask_mod(b, h, q_idx, kv_idx_):
        return m[b if per_batch else 0, h if per_head else 0, q_idx, kv_idx_]

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                  seq_lengths=(q.shape[-2], k.shape[-2]))  # with the q-side blocks, as
    #                                                 create_block_mask builds it (the well-trodden path)
    return flex_attention(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@torch.library.custom_op("routefx_triton::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` that Inductor cannot fuse into its consumers (an opaque op's output is a buffer). The mask
    function of a FlexAttention template must read a buffer: a mask computed in the same graph (from
    `attention_mask`, by index and compare ops) is otherwise inlined into the template, which Inductor's CPU
    template refuses ("All the buffers in the score and mask subgraph should be in
    kernel_group.args.input_buffers", torch 2.11)."""
    return x.clone()


@materialize.register_fake
def _(x):
    return torch.empty_like(x)


def mask_blocks(mask, q, k):
    """The block tensors of `mask` for queries `q` and keys `k`, or None when SDPA stays (short lengths)."""
    if not _use_flex(q, k):
        return None
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return block_mask_tensors(materialize(m.contiguous()), q.shape[-2], k.shape[-2])


def _rewritable(n: fx.Node, dtypes):
    """(q, k, v, mask, scale, enable_gqa) of an SDPA node FlexAttention can take (module docstring), or None."""
    parts = sdpa_parts(n)
    if parts is None:
        return None
    q, k, v, mask = parts[:4]
    qv, kv, vv, mv = (x.meta.get("val") if isinstance(x, fx.Node) else None for x in (q, k, v, mask))
    if any(t is None for t in (qv, kv, vv)) or not 2 <= mv.dim() <= 4 or not qv.dim() == kv.dim() == vv.dim() == 4:
        return None
    if qv.dtype not in dtypes or qv.shape[-1] not in HEAD_DIMS or vv.shape[-1] != qv.shape[-1]:
        return None
    mshape = [1] * (4 - mv.dim()) + list(mv.shape)
    if str(mshape[1]) not in ("1", str(qv.shape[1])):  # a mask per key/value head only: leave SDPA
        return None
    return parts


def flex_attention_(gm: fx.GraphModule, dtypes=(torch.float16, torch.bfloat16)) -> int:
    """Rewrite each SDPA with a boolean mask (module docstring) as `flex_sdpa`, with the block tensors computed
    once per mask and lengths. Returns the number of attentions rewritten."""
    return rewrite_masked_sdpa(
        gm, lambda n: _rewritable(n, dtypes),
        shared_key=lambda p: (p[3], str(p[0].meta["val"].shape[-2]), str(p[1].meta["val"].shape[-2])),
        make_shared=lambda g, p: g.call_function(mask_blocks, (p[3], p[0], p[1])),
        make_call=lambda g, p, blocks: g.call_function(flex_sdpa, (*p[:4], blocks),
                                                        {"scale": p[4], "enable_gqa": p[5]}))
