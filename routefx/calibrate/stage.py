"""Calibration before the rewrite: policy + captured graph + data -> Plan (the decisions the passes apply).

Dense needs none; PruneLayers ranks blocks by Block Influence (`influence.py`); Duo orders neurons, sizes the
small branch and trains routers (`duo.py`); MoEfy clusters neurons into experts and fits expert routers
(`moefy.py`); MoEBudget(hoist=True) fits pre-gating routers (`moe_hoist.py`). What must be measured on the
rewritten graph (the price λ that meets the budget) is the pipeline's budget step (`budget.py`).
"""
from __future__ import annotations

import math

import torch
from torch import fx

from routefx.calibrate.block_refs import resolve_blocks
from routefx.calibrate.duo import calibrate_duo
from routefx.calibrate.influence import block_influence
from routefx.calibrate.moe_hoist import calibrate_moe_hoist
from routefx.calibrate.moefy import calibrate_moefy
from routefx.compiler.plan import Plan
from routefx.compiler.policies import Dense, Duo, MoEBudget, MoEfy, Policy, PruneLayers
from routefx.errors import PolicyError, UnsupportedModelError
from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import ModelIR
from routefx.passes.prune_blocks import ONLY_THE_STREAM, READ_LATER

__all__ = ["calibrate"]


def _prune(policy: PruneLayers, gm: fx.GraphModule, ir: ModelIR, batches: list[dict] | None, plan: Plan) -> None:
    """The blocks to remove. At least one block holding attention stays (a hybrid's recurrent or MLP-only blocks
    alone are no transformer: recognition would find no blocks in what is left): an explicit list that removes
    them all is refused; `keep` passes over the last one in the Block Influence order. Likewise a block whose
    values other than the residual stream a kept block reads (shared keys and values): refused when listed,
    passed over by `keep`."""
    L = len(ir.blocks)
    attention = {b.index for b in ir.blocks if b.attention}
    if policy.layers is not None:
        pruned = resolve_blocks("PruneLayers", policy.layers, ir)
        if len(pruned) < L and attention and attention <= set(pruned):
            raise PolicyError(f"PruneLayers would remove every block that holds attention ({sorted(attention)} of "
                              f"{L} blocks); keep at least one of them")
    else:
        plan.block_influence = block_influence(gm, ir, batches)
        n = min(math.floor((1 - policy.keep) * L + 0.5), L - 1)
        order = sorted(range(L), key=lambda i: (plan.block_influence[i], i))
        pruned = []
        for i in order:
            if len(pruned) == n:
                break
            if attention and attention <= set(pruned) | {i}:
                continue  # the last attention block stays
            if read_by_later_blocks(ir, i, set(pruned) | {i}) is not None:
                continue  # a later block reads its keys and values (or other state): it stays
            pruned.append(i)
        pruned.sort()
    if len(pruned) >= L:
        raise PolicyError(f"PruneLayers would remove all {L} blocks; keep at least one")
    for i in pruned:
        if (read := read_by_later_blocks(ir, i, set(pruned))) is not None:
            raise UnsupportedModelError(f"PruneLayers: {read}; {ONLY_THE_STREAM} (prune other blocks, or this "
                                        "one with the blocks that read it)")
    plan.pruned = pruned


def read_by_later_blocks(ir: ModelIR, i: int, pruned: set[int]) -> str | None:
    """Why block `i` cannot be pruned with the blocks `pruned`: a value it computes besides the residual stream
    that the graph still reads once the pruned blocks' streams are bypassed (Gemma 4's and HY-V4's layers that
    reuse an earlier layer's keys and values or indexer); None when nothing of it is left. What the graph still
    reads is found backwards from its outputs, a pruned block's stream after it standing for its stream before."""
    bypass = {ir.blocks[j].stream_out: ir.blocks[j].stream_in for j in pruned}
    output = next(n for n in reversed(ir.blocks[i].stream_out.graph.nodes) if n.op == "output")
    live, stack = set(), [output]
    while stack:
        n = stack.pop()
        while n in bypass:
            n = bypass[n]
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    b = ir.blocks[i]
    inside = set(b.nodes)
    for n in sorted(inside & live, key=lambda n: n.name):
        if not isinstance(gu.val(n), torch.Tensor):
            continue
        reader = next((u for u in n.users if u in live and u not in inside and isinstance(gu.val(u), torch.Tensor)),
                      None)
        if reader is not None:
            what = n.name + (f" ({gu.module_path(n)})" if gu.module_path(n) else "")
            where = f" in {gu.module_path(reader)}" if gu.module_path(reader) else ""
            return (f"block {i}" + (f" ({b.path})" if b.path else "") + f" computes {what}, read by {reader.name}"
                    f"{where}: {READ_LATER}")
    return None


def _weights(nodes, params: set[str]) -> set[str]:
    """The parameters among `params` (get_attr targets) that `nodes` read."""
    return {a.target for n in nodes for a in (n, *n.all_input_nodes) if a.op == "get_attr" and a.target in params}


def check_blocks_rewritable(policy: Policy, gm: fx.GraphModule, ir: ModelIR) -> None:
    """Policies that rewrite blocks one by one need each recognised block to own its FFN weights and its FFN to sit
    in a module of its own (plans name FFNs by module path); found otherwise: a clear refusal, not a broken pass
    contract further on. Two blocks in one layer module with distinct FFN modules (a recurrence branch and an MLP
    branch) are fine. PruneLayers and Duo also take a model that runs a layer module more than once (a looped or
    recurrent-depth model: each run one block, pruned on its own or all at once by the module's path; Duo routes
    each run with a router of its own, keyed `path@run`), where each such block is one whole run
    of one module and the block reading raised no doubt."""
    name = type(policy).__name__
    params = {name for name, _ in gm.named_parameters()}
    weights = [_weights(b.ffn_nodes, params) for b in ir.blocks]   # the FFN weights: what the policies rewrite
    runs = isinstance(policy, (PruneLayers, Duo))   # policies that take runs of one module as blocks
    for i, a in enumerate(ir.blocks):
        for b in ir.blocks[i + 1:]:
            shared = weights[a.index] & weights[b.index]
            if shared and runs and a.path and a.path == b.path and not ir.notes:
                continue        # two runs of one layer module
            if shared:
                what = (f"{name}: blocks {a.index} and {b.index} run the same FFN weights ({sorted(shared)[0]}, "
                        f"{len(shared)} in all): the model runs its layer modules more than once (weights shared "
                        f"across depth, {len(ir.blocks)} blocks from fewer modules); ")
                if runs:
                    why = f"the block reading is in doubt ({ir.notes[0]})" if ir.notes else \
                        f"they lie in modules {a.path} and {b.path}"
                    raise UnsupportedModelError(what + f"{name} takes such a model where each block is one whole "
                                                f"run of one layer module, but here {why} (Dense compiles this model)")
                raise UnsupportedModelError(what + f"{name} rewrites each block's own weights; supported: models "
                                            "whose blocks each own their weights (Dense compiles this model)")
            if a.ffn and b.ffn and a.key == b.key:
                raise UnsupportedModelError(
                    f"{name}: blocks {a.index} and {b.index} were both recognised with their FFN in module {a.key}: "
                    "its layer adds more to the residual stream than one attention and one FFN branch (or "
                    "rescales the stream), which routefx cannot split into blocks by module; "
                    f"{name} needs each block's FFN in a module of its own; supported: layers of attention (or "
                    "recurrence) and FFN branches added to the residual stream (Dense compiles this model)")


def check_moe_blocks(gm: fx.GraphModule, ir: ModelIR) -> None:
    """MoEBudget needs a MoE block RaiseMoE can rewrite; found none: what each block is and why, not a broken
    pass contract further on."""
    from routefx.passes.raise_moe import moe_matches
    found = list(moe_matches(gm, ir))
    if any(not isinstance(m, str) and not m.weights_on_input for _, m in found):
        return
    batched = [b.index for b, m in found if not isinstance(m, str)]
    if batched:
        raise PolicyError(f"MoEBudget: the MoE blocks {batched} weight each chosen expert's input, not its output "
                          "(batched experts: every expert on every token as captured, the unchosen ones weighted 0); "
                          "MoEBudget drops experts by their output gates' mass and has no rule for input weights. "
                          "Dense (or any policy) already runs only the chosen experts of these blocks")
    kinds = sorted({b.ffn.kind for b in ir.blocks if b.ffn})
    why = next((f"; block {b.index}'s experts are not read: {m}" for b, m in found), "") or next(
        (f"; block {b.index}'s FFN is not read: {b.ffn.reason}" for b in ir.blocks
         if b.ffn and b.ffn.kind == "unknown" and b.ffn.reason), "")
    raise PolicyError(f"MoEBudget: the model has no MoE block to adapt (found FFN kinds: {kinds}{why}); MoEBudget "
                      "adapts top-k MoE blocks whose experts routefx reads as routed_ffn ranges"
                      + ("; dense FFNs take the Duo policy" if {"gated", "mlp"} & set(kinds) else ""))


def calibrate(policy: Policy, gm: fx.GraphModule, ir: ModelIR, batches: list[dict] | None) -> Plan:
    plan = Plan(policy=policy.to_dict(), block_paths=[b.path for b in ir.blocks])
    if isinstance(policy, (PruneLayers, Duo, MoEfy)):
        check_blocks_rewritable(policy, gm, ir)
    if isinstance(policy, MoEBudget):
        check_moe_blocks(gm, ir)
    if isinstance(policy, MoEBudget) and policy.hoist:
        calibrate_moe_hoist(gm, ir, batches, plan)  # pre-gating routers; λ is fitted later, as without
    elif isinstance(policy, (Dense, MoEBudget)):
        pass  # MoEBudget's one decision, the price λ, is fitted on the rewritten graph (calibrate/moe_budget.py)
    elif isinstance(policy, PruneLayers):
        _prune(policy, gm, ir, batches, plan)
    elif isinstance(policy, Duo):
        calibrate_duo(policy, gm, ir, batches, plan)
    elif isinstance(policy, MoEfy):
        calibrate_moefy(policy, gm, ir, batches, plan)
    else:
        raise PolicyError(f"no calibration for policy {type(policy).__name__}")
    return plan
