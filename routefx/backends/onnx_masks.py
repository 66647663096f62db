"""Attention masks that broadcast over the keys, expanded before the ONNX export.

torch's scaled_dot_product_attention broadcasts its mask, so a mask with one key column applies to every key:
MiniMax's decode step builds its mask from the cache length of its first layer, a linear-attention layer that
keeps no keys, and gets [B, 1, 1, 1]. The exporter hands the mask to ONNX `Attention` as it is, and ONNX Runtime's
kernel requires the mask's last dim to equal the total key length (it fails with "inconsistent
total_sequence_length"). Each 4-D mask whose last two dims are not known to be the query and key lengths is
expanded to them first: torch's broadcast, written out.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from routefx.ir import graph_utils as gu

__all__ = ["expand_attention_masks"]

_aten = torch.ops.aten


def _mask_of(n: fx.Node) -> tuple[fx.Node | None, int | str | None]:
    """The SDPA node's attn_mask and where it sits (arg index or keyword)."""
    if len(n.args) > 3:
        return n.args[3], 3
    return n.kwargs.get("attn_mask"), "attn_mask"


def _needs_expanding(n: fx.Node) -> bool:
    mask, _ = _mask_of(n)
    if not isinstance(mask, fx.Node):
        return False
    q, k, m = (x.meta.get("val") if isinstance(x, fx.Node) else None for x in (n.args[0], n.args[1], mask))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, m)) or m.dim() != 4 or q.dim() != 4 or k.dim() != 4:
        return False
    return not (statically_known_true(m.shape[-1] == k.shape[-2])
                and statically_known_true(m.shape[-2] == q.shape[-2]))


def expand_attention_masks(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """(graph, number of masks expanded): a copy of `gm` where some mask broadcasts over the queries or keys,
    else `gm` itself."""
    names = {n.name for n in gm.graph.nodes
             if n.op == "call_function" and n.target == _aten.scaled_dot_product_attention.default
             and _needs_expanding(n)}
    if not names:
        return gm, 0
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)                       # routefx's capture info, the fake mode
    gm = new
    with gu.fake_mode(gm) or contextlib.nullcontext():
        for n in [n for n in gm.graph.nodes if n.name in names]:
            mask, where = _mask_of(n)
            q, k, m = n.args[0].meta["val"], n.args[1].meta["val"], mask.meta["val"]
            with gm.graph.inserting_before(n):
                dims = []
                for src, dim, val in ((mask, 0, m.shape[0]), (mask, 1, m.shape[1]), (n.args[0], 2, q.shape[2]),
                                      (n.args[1], 2, k.shape[2])):
                    if isinstance(val, int):
                        dims.append(val)
                        continue
                    size = gm.graph.call_function(_aten.sym_size.int, (src, dim))
                    size.meta["val"] = val
                    dims.append(size)
                expanded = gm.graph.call_function(_aten.expand.default, (mask, dims))
                expanded.meta["val"] = m.expand(m.shape[0], m.shape[1], q.shape[2], k.shape[2])
            if where == 3:
                n.args = (*n.args[:3], expanded, *n.args[4:])
            else:
                n.kwargs = {**n.kwargs, "attn_mask": expanded}
    gm.recompile()
    return gm, len(names)
