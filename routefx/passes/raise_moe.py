"""RaiseMoE: replace each recognised top-k MoE block's expert dispatch by one `routefx::routed_ffn`.

Requires: `ctx.ir` recognised on `gm`.
Ensures:  every MoE FFN of `ctx.ir` is either a `routed_ffn` whose ranges are its experts (E equal ranges of the
          expert width F over one concatenated weight, K routes and K gates per token), or still a captured MoE
          block, reported as a miss with the reason.

What is kept and what is replaced (T = tokens, d = hidden, E = experts, K = routes per token, F = expert width):

    x [T, d] --router product--> scores [T, E] --scoring/top-k (kept as captured)--> routes [T, K] int64
                                                                                 \\--> gates  [T, K] float
    x, routes, gates --sort/histc/grouped GEMMs/un-permute/sum over K (replaced)--> combine [T, d]
    combine --(kept: casts, reshape to [B, S, d], shared expert added, output scaling)--> branch output

The router subgraph is kept as it is, so every scoring the model computes (softmax or sigmoid, top-k with or
without renormalisation, Phi-MoE's sparsemixer, DeepSeek-V3's group-limited top-k, a scaling of the gates) needs
no pattern of its own: the pass only finds its two results by shape — `routes` is the last integer [T, K] value
from the scores that reaches the experts, `gates` the last floating [T, K] value from the scores that reaches the
combine without feeding the experts' inputs. The replaced dispatch must read nothing but x (through views),
routes and gates, or the block is left as captured with the reason.

A shared expert (Qwen2-MoE, DeepSeek-V3), with or without its own sigmoid gate, stays the dense FFN it was
captured as, added after the combine: choosing it as an extra range would save nothing on CPU (every token takes
it) and its sigmoid gate lives outside the routed experts' gate tensor.

Weights: the experts' stacked grouped-GEMM weights ([E, d, 2F] fused gate-up and [E, F, d] down as the grouped
GEMM reads them) are copied once, at compile time, into [E*F, d] gate and up and a [d, E*F] down buffer, expert e
being the neuron range [e*F, (e+1)*F). A copy is unavoidable for the fused layout: each expert's gate and up
halves interleave in the stored tensor. The user's model is never modified.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from routefx.ir import graph_utils as gu
from routefx.ir.model_ir import BlockInfo, ModelIR, WeightRef
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Miss, Pass, PassContext, PassResult
from routefx.passes.raise_ffn import weight_node

aten = torch.ops.aten
__all__ = ["RaiseMoE", "match_moe", "moe_matches", "MoEMatch"]

_SPLITS = gu.targets(aten.chunk, aten.split, aten.split_with_sizes, aten.slice)
_MASKING = gu.targets(aten.masked_fill, aten.where)
_SORTS = gu.targets(aten.sort, aten.argsort)
_UNPERMUTE = gu.targets(aten.index, aten.index_put, aten.index_put_, aten.index_add, aten.index_add_, aten.scatter,
                        aten.scatter_add, aten.scatter_reduce, aten.gather, aten.index_select, aten.index_copy)
_TRANSPOSE = gu.targets(aten.transpose, aten.permute)


class _Miss(Exception):
    """The block does not match; the message is the reason reported."""


@dataclasses.dataclass(eq=False)
class MoEMatch:
    """Anchors of one MoE block's dispatch and its expert weights as per-neuron [E*F, d] tensors."""

    x: fx.Node           # [T, d] the router product's input (the experts read the same value)
    router: fx.Node      # [T, E] the router product (its scores' logits)
    routes: fx.Node      # [T, K] integer expert ids
    gates: fx.Node       # [T, K] floating gate weights
    combine: fx.Node     # [T, d] the routed experts' weighted sum: the node the routed_ffn replaces
    experts: int
    width: int
    activation: str
    w_up: torch.Tensor   # [E*F, d]
    w_gate: torch.Tensor | None  # [E*F, d], None for plain (non-gated) experts
    w_down: torch.Tensor  # [d, E*F]


def _shape(n: fx.Node) -> list[str] | None:
    v = gu.val(n)
    return None if not isinstance(v, torch.Tensor) else [str(s) for s in v.shape]


def _stacked(gm: fx.GraphModule, n: fx.Node) -> torch.Tensor:
    """The [E, in, out] tensor a grouped GEMM reads as its weight operand (a parameter, possibly transposed)."""
    flips = 0
    while n.op == "call_function":
        if gu.is_identity(n):
            n = n.args[0]
        elif n.target in gu.targets(aten.transpose) and sorted(a % 3 for a in n.args[1:3]) == [1, 2]:
            flips, n = flips + 1, n.args[0]
        else:
            raise _Miss(f"expert weight computed by {n.target}, not read from a stacked parameter")
    if n.op != "get_attr":
        raise _Miss("expert weight is not a parameter")
    w = gu.fetch_attr(gm, n.target)
    if w.dim() != 3:
        raise _Miss(f"expert weight {n.target} has shape {list(w.shape)}, not [E, in, out]")
    return w.transpose(1, 2) if flips % 2 else w


def _past_masking(n: fx.Node) -> fx.Node:
    """`n` forward through views and shape-keeping masking (transformers 5.17 zeroes rows of tokens routed to no
    expert right after each grouped GEMM)."""
    n = gu.forward_views(n)
    while len(n.users) == 1:
        u = next(iter(n.users))
        if u.op != "call_function" or u.target not in _MASKING or _shape(u) != _shape(n):
            break
        n = gu.forward_views(u)
    return n


def _halves(up: fx.Node, out_width: int) -> dict[fx.Node, tuple[int, int]]:
    """Parts of the fused gate-up output: part node -> [start, end) columns."""
    out = _past_masking(up)
    parts: dict = {}
    for u in out.users:
        if u.op != "call_function" or u.target not in _SPLITS:
            continue
        if u.target in gu.targets(aten.slice):
            if u.args[1] not in (-1, 1) or (len(u.args) > 4 and u.args[4] != 1):
                raise _Miss("fused gate-up output sliced other than by contiguous columns")
            parts[u] = (int(u.args[2]), min(int(u.args[3]), out_width))
            continue
        dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
        if dim not in (-1, 1):
            raise _Miss(f"fused gate-up output split along dim {dim}, not the last")
        for g in u.users:
            if gu.is_getitem(g):
                size = int(gu.val(g).shape[-1])
                if u.target in gu.targets(aten.split_with_sizes):
                    sizes = list(u.args[1])
                    start = sum(sizes[:g.args[1]])
                else:
                    start = g.args[1] * size
                parts[g] = (start, start + size)
    return parts


def _weights(gm, up: fx.Node, down: fx.Node):
    """(w_up, w_gate [E*F, d], w_down [d, E*F]) as contiguous copies, F, and the (src, dst) nodes of the activation."""
    w_in = _stacked(gm, up.args[1])      # [E, d, F2]
    w_out = _stacked(gm, down.args[1])   # [E, F, d]
    E, d, F2 = w_in.shape
    F = w_out.shape[1]
    if w_out.shape != (E, F, d):
        raise _Miss(f"expert weights of shapes {list(w_in.shape)} and {list(w_out.shape)} do not chain")
    rows = lambda a, b: w_in[:, :, a:b].transpose(1, 2).reshape(E * (b - a), d).contiguous()  # noqa: E731
    down_rows = w_out.permute(2, 0, 1).reshape(d, E * F).contiguous()  # [d, E*F], row-major (Triton's layout)
    e = gu.root_views(down.args[0])
    if F2 == F:
        return rows(0, F), None, down_rows, F, (_past_masking(up), e)
    if F2 != 2 * F:
        raise _Miss(f"experts' first product has {F2} outputs for {F} hidden neurons (neither F nor 2F)")
    parts = _halves(up, F2)
    if len(parts) != 2 or e.op != "call_function" or e.target not in gu.targets(aten.mul):
        raise _Miss("fused gate-up output is not cut in two halves combined by a product")
    p, q = (gu.root_views(a) for a in e.args[:2])
    if q not in parts:
        p, q = q, p
    gate_part = [g for g in parts if g is not q]
    if q not in parts or len(gate_part) != 1 or sorted(parts.values()) != [(0, F), (F, 2 * F)]:
        raise _Miss("fused gate-up halves are not combined as act(gate) * up")
    (gs, ge), (us, ue) = parts[gate_part[0]], parts[q]
    return rows(us, ue), rows(gs, ge), down_rows, F, (gate_part[0], p)


def _dead_write_into(u: fx.Node, nodes: set) -> bool:
    """`u` is an in-place op nothing reads, writing into (a view or tuple item of) a value in `nodes`."""
    if u.users or u.op != "call_function" or not isinstance(u.target, torch._ops.OpOverload) \
            or not u.target._schema.is_mutable or not u.args or not isinstance(u.args[0], fx.Node):
        return False
    base = u.args[0]
    while base not in nodes and base.op == "call_function" and (gu.is_getitem(base) or base.target in gu.VIEWS):
        base = base.args[0]
    return base in nodes


def match_moe(gm: fx.GraphModule, block: BlockInfo) -> MoEMatch:
    """The dispatch of `block`'s MoE FFN; raises `_Miss` with the reason when it cannot be expressed."""
    from routefx.ir.ffn import identify_activation
    f = block.ffn
    region = set(block.ffn_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    grouped = sorted((n for n in region if gu.is_grouped_mm(n)), key=order.get)
    if len(grouped) != 2:
        raise _Miss(f"expected the experts as a pair of grouped GEMMs (up, down), found {len(grouped)} "
                    "(per-expert loops are not read)")
    up, down = grouped
    feeds = gu.ancestors([up])
    mms = [n for n in region if gu.is_matmul(n) and not gu.is_grouped_mm(n) and n in feeds
           and _shape(n) is not None and _shape(n)[-1] == str(f.num_experts)]
    if len(mms) != 1:
        raise _Miss(f"expected one router product with {f.num_experts} outputs feeding the experts, "
                    f"found {len(mms)}")
    router = mms[0]
    x = router.args[0] if router.target in gu.targets(aten.linear, aten.mm, aten.matmul) else router.args[1]
    lead = _shape(router)[:-1]
    from_router = gu.descendants(router)
    # token-mixing dispatch steps (a sort of the flattened expert ids): values after them are in sorted order,
    # even where their shape looks per-token ([T, 1] when k = 1)
    mixed = set().union(*(gu.descendants(n) for n in region & from_router
                          if n.target in _SORTS and gu.val(n.args[0]) is not None and gu.val(n.args[0]).dim() == 1))
    after = sorted((n for n in region & from_router - mixed if _shape(n) is not None and _shape(n)[:-1] == lead
                    and _shape(n)[-1] == str(f.top_k)), key=order.get)
    ints = [n for n in after if not gu.val(n).is_floating_point() and gu.val(n).dtype != torch.bool and n in feeds]
    if not ints:
        raise _Miss("no [tokens, k] integer expert choice found between the router and the experts")
    routes = ints[-1]
    k = _shape(routes)[-1]
    from_down = region & gu.descendants(down)
    unpermuted = [n for n in from_down if n.target in _UNPERMUTE]
    if mixed and unpermuted:  # a dispatch in sorted order: its sum comes after the un-permute ([T·k, d] = [T, d]
        from_down &= set().union(*(gu.descendants(u) | {u} for u in unpermuted))  # when k = 1)
    combine = next((n for n in sorted(from_down, key=order.get) if _shape(n) == _shape(x)), None)
    if combine is None:
        raise _Miss(f"no [tokens, d] sum of the experts' outputs after the down product (x is {_shape(x)})")
    feeds_combine = gu.ancestors([combine])
    floats = [n for n in after if gu.val(n).is_floating_point() and _shape(n)[-1] == k and n in feeds_combine
              and n not in feeds]
    if not floats:
        raise _Miss("no [tokens, k] floating gate weights found between the router and the experts' sum")
    gates = floats[-1]

    # The replaced dispatch: what reaches the combine from x, routes and gates, and nothing else.
    kept = gu.ancestors([routes, gates]) | {routes, gates}
    x_root = gu.root_views(x)
    # views of the block's input are not the dispatch's: the experts may read their own reshape of it, which a
    # shared expert reads too (AFMoE flattens the input once for both, the router flattens it again)
    replaced = {n for n in (feeds_combine & region) - kept - gu.ancestors([x]) - {x}
                if gu.root_views(n) is not x_root} | {combine}
    for n in replaced:
        for a in n.all_input_nodes:
            if a in replaced or a in (routes, gates) or a not in region or gu.root_views(a) is x_root:
                continue
            raise _Miss(f"the expert dispatch reads {a.name} ({a.target}), which is not the routes, the gates or "
                        "the block's input")
        # readers outside the dispatch, other than dead in-place writes (transformers 5.17 clamps the sorted
        # expert ids in place after its grouped GEMMs and never reads them again)
        escaping = [u for u in n.users if u not in replaced and not _dead_write_into(u, replaced)]
        if n is not combine and escaping:
            u = escaping[0]
            raise _Miss(f"{u.name} reads {n.name}, an intermediate value of the expert dispatch")
    if gu.root_views(up.args[0]) not in replaced and gu.root_views(up.args[0]) is not x_root:
        raise _Miss("the experts do not read the router's input")
    w_up, w_gate, w_down, F, (src, dst) = _weights(gm, up, down)
    try:
        act = identify_activation(src, dst)
    except Exception as e:  # the activation reader's miss: its message is the reason
        raise _Miss(f"expert activation: {e}") from None
    if f.num_experts * F != w_up.shape[0]:
        raise _Miss(f"{w_up.shape[0] // F} stacked experts, the router scores {f.num_experts}")
    return MoEMatch(x, router, routes, gates, combine, f.num_experts, F, act, w_up, w_gate, w_down)


def moe_matches(gm: fx.GraphModule, ir: ModelIR):
    """(block, MoEMatch or the reason it cannot be raised) for each MoE block of `ir` not yet raised, in block
    order."""
    for block in ir.blocks:
        f = block.ffn
        if f is None or f.kind != "moe" or f.routed is not None:
            continue  # not MoE, or already raised
        try:
            yield block, match_moe(gm, block)
        except _Miss as miss:
            yield block, str(miss)


class RaiseMoE(Pass):
    name = "raise_moe"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        for block, m in moe_matches(gm, ctx.ir):
            f = block.ffn
            if isinstance(m, str):
                where = f"block {block.index}" + (f" ({f.path})" if f.path else "")
                res.misses.append(Miss(where, f"MoE block left as captured: {m}"))
                continue
            key = block.key
            with g.inserting_before(m.combine):
                routes = m.routes
                if gu.val(routes).dtype != torch.int64:
                    routes = g.call_function(aten.to.dtype, (routes, torch.int64))
                w = {}
                for name, t in (("up", m.w_up), ("gate", m.w_gate), ("down", m.w_down)):
                    if t is not None:
                        w[name] = weight_node(g, WeightRef(add_tensor_attr(gm, f"routefx_{key}_experts_{name}", t)))
                op = g.call_function(gu.ROUTED_FFN, (
                    m.x, routes, m.gates, w["up"], w.get("gate"), w["down"], None, None, None,
                    [v for e in range(m.experts) for v in (e * m.width, (e + 1) * m.width)], m.activation))
            op.meta["nn_module_stack"] = m.combine.meta.get("nn_module_stack", {})
            op.meta["routefx_path"] = f.path
            m.combine.replace_all_uses_with(op)
            res.rewrites += 1
        if res.rewrites:
            res.notes.append(f"{res.rewrites} MoE block(s) dispatch their experts through routed_ffn; shared "
                             "experts stay dense FFNs added after it")
        return res

    def ensures(self, gm: fx.GraphModule, ctx: PassContext, after: ModelIR) -> str | None:
        if len(after.blocks) != len(ctx.ir.blocks):
            return f"{len(ctx.ir.blocks)} blocks before the pass, {len(after.blocks)} after"
        for b0, b1 in zip(ctx.ir.blocks, after.blocks):
            f0, f1 = b0.ffn, b1.ffn
            if f0 is None or f0.kind != "moe":
                continue
            if f1 is not None and f1.kind == "moe" and f1.routed is None:
                continue  # left as captured (a miss)
            F, E = f0.intermediate_size, f0.num_experts
            want = [[e * F, (e + 1) * F] for e in range(E)]
            if f1 is None or f1.routed != want:
                got = None if f1 is None else f1.routed
                return f"MoE block {b0.index} is neither left as captured nor a routed_ffn over its {E} experts " \
                       f"of width {F} (found ranges {got})"
        return None
