"""PruneBlocks: remove whole blocks, so the residual stream goes from before each pruned block to after it.

Requires: `ctx.plan.pruned`, block indices into `ctx.ir.blocks`.
Ensures:  those blocks are gone (every use of the stream after a pruned block reads the stream before it); the
          other blocks are untouched. For post-norm blocks the stream after includes the block's output norm.
"""
from __future__ import annotations

import torch
from torch import fx

from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import ModelIR
from routefx.passes.base import Pass, PassContext, PassResult

__all__ = ["PruneBlocks"]


def _pruned(ctx: PassContext) -> list[int]:
    return list(ctx.plan.pruned) if ctx.plan is not None else []


class PruneBlocks(Pass):
    name = "prune_blocks"

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> str | None:
        bad = [i for i in _pruned(ctx) if not 0 <= i < len(ctx.ir.blocks)]
        return f"planned block(s) {bad} are not among the {len(ctx.ir.blocks)} blocks" if bad else None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        pruned = _pruned(ctx)
        # last first: after pruning block i+1, its stream-after reads block i's stream-after, which is
        # then redirected in turn
        for i in sorted(pruned, reverse=True):
            b = ctx.ir.blocks[i]
            b.stream_out.replace_all_uses_with(b.stream_in)
            score = ""
            if ctx.plan.block_influence is not None:
                score = f", block influence {ctx.plan.block_influence[i]:.4g}"
            res.notes.append(f"removed block {i}" + (f" ({b.path})" if b.path else "") + score)
            res.rewrites += 1
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        for i in _pruned(ctx):
            if (left := _still_computed(ctx.ir.blocks[i])) is not None:
                return left
        want = [b.path for i, b in enumerate(ctx.ir.blocks) if i not in set(_pruned(ctx))]
        have = [b.path for b in after.blocks]
        return None if have == want else (
            f"blocks after pruning are {have}, expected {want}: removing the pruned blocks changed the blocks after "
            f"them; {ONLY_THE_STREAM}")


def _still_computed(b) -> str | None:
    """Why block `b` is not gone after its stream was bypassed and dead code removed: a later block still reads a
    value it computes (Gemma 4's KV-sharing layers read an earlier layer's keys and values); None when it is."""
    inside = set(b.nodes)
    # tensors of the block that a tensor op outside it reads (size checks torch.export left on a pruned block's
    # data-dependent sizes read its scalars, and compute nothing another block sees)
    read, reader = next(((n, u) for n in sorted(inside, key=lambda n: n.name) if not n._erased
                         and isinstance(gu.val(n), torch.Tensor) for u in n.users
                         if u not in inside and isinstance(gu.val(u), torch.Tensor)), (None, None))
    if read is None:
        return None
    what = read.name + (f" ({gu.module_path(read)})" if gu.module_path(read) else "")
    what += f", read by {reader.name}" + (f" in {gu.module_path(reader)}" if gu.module_path(reader) else "")
    return (f"block {b.index}" + (f" ({b.path})" if b.path else "") + f" is still computed after pruning: "
            f"{what}: {READ_LATER}; {ONLY_THE_STREAM}")


READ_LATER = ("a later block reads values this block computes besides the residual stream (keys and values shared "
              "across layers, state passed between layers)")
ONLY_THE_STREAM = "PruneLayers supports blocks that pass each other nothing but the residual stream"
