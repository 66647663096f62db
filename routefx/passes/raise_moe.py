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
from routefx.ir.activations import get_activation
from routefx.ir.ffn import (MOE_TOP_K, batched_experts, elementwise_fn, expert_epilogue, expert_ffns, fetch,
                            first_after, identify_activation, identify_glu, resolve_weight, stacked_weight,
                            table_routes)
from routefx.ir.ops import routed_ffn_reference
from routefx.ir.model_ir import BlockInfo, ModelIR, WeightRef
from routefx.passes.attrs import add_tensor_attr
from routefx.passes.base import Miss, Pass, PassContext, PassResult
from routefx.passes.raise_ffn import weight_node

aten = torch.ops.aten
__all__ = ["RaiseMoE", "match_moe", "moe_matches", "MoEMatch"]

_SPLITS = gu.targets(aten.chunk, aten.split, aten.split_with_sizes, aten.slice)
_SORTS = gu.targets(aten.sort, aten.argsort)
_UNPERMUTE = gu.targets(aten.index, aten.index_put, aten.index_put_, aten.index_add, aten.index_add_, aten.scatter,
                        aten.scatter_add, aten.scatter_reduce, aten.gather, aten.index_select, aten.index_copy)
_ZERO_FILLS = gu.targets(aten.zeros, aten.zeros_like, aten.new_zeros)
_FILLS = {aten.full: 1, aten.full_like: 1, aten.new_full: 2}   # fill op -> position of its value


class _Miss(Exception):
    """The block does not match; the message is the reason reported."""


@dataclasses.dataclass(eq=False)
class MoEMatch:
    """Anchors of one MoE block's dispatch and its expert weights as per-neuron [E*F, d] tensors."""

    x: fx.Node           # [T, d] the router product's input (the experts read it too, unless `x_experts`)
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
    # each (token, chosen expert) pair's gate scales the expert's *input*: the routed_ffn then runs each pair as a
    # row of its own, with no output gate
    weights_on_input: bool = False
    per_expert_gates: bool = False      # `gates` is [T, E] (batched experts: zero off the chosen), not [T, K]
    b_up: torch.Tensor | None = None     # [E*F] per-expert FFN modules with biases (`_match_per_expert`)
    b_gate: torch.Tensor | None = None
    b_down: torch.Tensor | None = None   # [d], the same for every expert
    b_experts: torch.Tensor | None = None   # [E, d] down biases that differ per expert: added after the op, per route
    checks: list = dataclasses.field(default_factory=list)  # run-time size checks on the replaced dispatch's
    # data-dependent sizes (torch.export's asserts): erased with it
    x_experts: fx.Node | None = None    # [T, d] the experts' input where it is not the router's (Gemma 4 normalises
    # the block input once for the router and once, with other weights, for the experts)

    @property
    def inp(self) -> fx.Node:
        """The routed_ffn's input: what the experts read."""
        return self.x if self.x_experts is None else self.x_experts


def _shape(n: fx.Node) -> list[str] | None:
    v = gu.val(n)
    return None if not isinstance(v, torch.Tensor) else [str(s) for s in v.shape]


def _stacked(gm: fx.GraphModule, n: fx.Node) -> torch.Tensor:
    """The [E, in, out] tensor a grouped or batched GEMM reads as its weight operand (a parameter, possibly
    transposed)."""
    w, reason = stacked_weight(gm, n)
    if w is None:
        raise _Miss(reason)
    return w


def _halves(out: fx.Node, out_width: int) -> dict[fx.Node, slice]:
    """Parts of the fused gate-up output `out`: part node -> its columns (contiguous, or every other column for an
    interleaved layout: GPT-OSS's gate_up[..., ::2] and [..., 1::2])."""
    parts: dict = {}
    for u in out.users:
        if u.op != "call_function" or u.target not in _SPLITS:
            continue
        if u.target in gu.targets(aten.slice):
            step = int(u.args[4]) if len(u.args) > 4 else 1
            if u.args[1] not in (-1, 1) or step not in (1, 2):
                raise _Miss("fused gate-up output sliced other than by contiguous or alternate columns")
            parts[u] = slice(int(u.args[2]), min(int(u.args[3]), out_width), step)
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
                parts[g] = slice(start, start + size, 1)
    return parts


def _weights(gm, up: fx.Node, down: fx.Node) -> dict:
    """The experts' weights as one routed_ffn's: w_up, w_gate [E*F, d] and w_down [d, E*F] as contiguous copies,
    per-expert biases (b_up, b_gate [E*F]; b_down [d] when every expert's is the same, else b_experts [E, d]), the
    width F and the activation name."""
    w_in = _stacked(gm, up.args[1])      # [E, d, F2]
    w_out = _stacked(gm, down.args[1])   # [E, F, d]
    E, d, F2 = w_in.shape
    F = w_out.shape[1]
    if w_out.shape != (E, F, d):
        raise _Miss(f"expert weights of shapes {list(w_in.shape)} and {list(w_out.shape)} do not chain")
    out, b_in = expert_epilogue(up)
    _, b_out = expert_epilogue(down)
    b_in = None if b_in is None else fetch(gm, b_in.target)      # [E, F2]
    b_out = None if b_out is None else fetch(gm, b_out.target)   # [E, d]
    if (b_in is not None and tuple(b_in.shape) != (E, F2)) or (b_out is not None and tuple(b_out.shape) != (E, d)):
        raise _Miss("per-expert biases whose shapes do not match the expert weights")
    rows = lambda cols: w_in[:, :, cols].transpose(1, 2).reshape(E * F, d).contiguous()  # noqa: E731
    bias = lambda cols: None if b_in is None else b_in[:, cols].reshape(E * F).contiguous()  # noqa: E731
    w = dict(w_down=w_out.permute(2, 0, 1).reshape(d, E * F).contiguous(), F=F)  # [d, E*F] (Triton's layout)
    if b_out is not None and bool((b_out == b_out[0]).all()):
        w["b_down"] = b_out[0].contiguous()
    elif b_out is not None:
        w["b_experts"] = b_out.contiguous()
    e = gu.root_views(down.args[0])
    if F2 == F:
        act = _expert_activation(identify_activation, out, e)
        return dict(w, w_up=rows(slice(0, F)), w_gate=None, b_up=bias(slice(0, F)), b_gate=None, activation=act)
    if F2 != 2 * F:
        raise _Miss(f"experts' first product has {F2} outputs for {F} hidden neurons (neither F nor 2F)")
    parts = _halves(out, F2)
    if len(parts) != 2 or sorted((c.start, c.stop, c.step) for c in parts.values()) not in (
            [(0, F, 1), (F, 2 * F, 1)], [(0, F2, 2), (1, F2, 2)]):
        raise _Miss("fused gate-up output is not cut in two halves (or alternate columns)")
    a, b = parts
    act, a_gate = _expert_activation(identify_glu, a, b, e)
    g_cols, u_cols = (parts[a], parts[b]) if a_gate else (parts[b], parts[a])
    return dict(w, w_up=rows(u_cols), w_gate=rows(g_cols), b_up=bias(u_cols), b_gate=bias(g_cols), activation=act)


def _expert_activation(reader, *nodes):
    """`reader(*nodes)` (an activation reader of `routefx.ir.ffn`), its miss raised as this pass's, with the reason."""
    try:
        return reader(*nodes)
    except Exception as e:  # noqa: BLE001 - the reader's miss: its message is the reason
        raise _Miss(f"expert activation: {e}") from None


def _dead_reader(u: fx.Node, nodes: set) -> bool:
    """`u` is read by nothing and reads a value in `nodes` without changing anything else: an unread tuple item (a
    sort's unused values), or an in-place op writing into (a view or tuple item of) a value in `nodes`."""
    if not u.users and gu.is_getitem(u):
        return True
    if u.users or u.op != "call_function" or not isinstance(u.target, torch._ops.OpOverload) \
            or not u.target._schema.is_mutable or not u.args or not isinstance(u.args[0], fx.Node):
        return False
    base = u.args[0]
    while base not in nodes and base.op == "call_function" and (gu.is_getitem(base) or base.target in gu.VIEWS):
        base = base.args[0]
    return base in nodes


def _dispatch_nodes(region: set, combine: fx.Node, keep: list, x: fx.Node, reads: bool = True
                    ) -> tuple[set, set]:
    """The dispatch a rewrite replaces: the region's nodes that reach `combine` (included), minus what `keep`
    (routes, gates, per-expert weights) needs and minus the block input x and its views. Raises `_Miss` where one of
    them reads anything else (when `reads`) or where a node outside it reads one of its intermediate values (other
    than a dead in-place write into it: transformers 5.17 clamps the sorted expert ids in place after its grouped
    GEMMs and never reads them again; or an unread tuple item). Returns (the nodes, torch.export's size checks on
    them, erased with them)."""
    kept = gu.ancestors(keep) | set(keep)
    x_root = gu.root_views(x)
    # views of the block's input are not the dispatch's: the experts may read their own reshape of it, which a
    # shared expert reads too (AFMoE flattens the input once for both, the router flattens it again)
    nodes = {n for n in (gu.ancestors([combine]) & region) - kept - gu.ancestors([x]) - {x}
             if gu.root_views(n) is not x_root} | {combine}
    checks: set = set()
    for n in nodes:
        for a in n.all_input_nodes if reads else ():
            if a in nodes or a in keep or a not in region or gu.root_views(a) is x_root:
                continue
            raise _Miss(f"the expert dispatch reads {a.name} ({a.target}), which is not the routes, the gates or "
                        "the block's input")
        for u in n.users if n is not combine else ():
            if u not in nodes and not _dead_reader(u, nodes) and not _checks_only(u, checks):
                raise _Miss(f"{u.name} reads {n.name}, an intermediate value of the expert dispatch")
    return nodes, checks


def _router(region: set, f, up: fx.Node, down: fx.Node) -> tuple[fx.Node, fx.Node, set, fx.Node | None]:
    """(the router product, its input x, the ancestors of the experts' first product, the expert ids where the
    router does not choose them (`ffn.table_routes`: hash routing), else None)."""
    feeds = gu.ancestors([up])
    cands = [n for n in region if gu.is_matmul(n) and n not in (up, down) and not gu.is_grouped_mm(n)
             and n in feeds and gu.val(n) is not None and isinstance(gu.val(n).shape[-1], int)]
    mms, table = [n for n in cands if gu.val(n).shape[-1] == f.num_experts], None
    if not mms:
        order = {n: i for i, n in enumerate(up.graph.nodes)}
        mms, table = table_routes(sorted((n for n in region if gu.is_matmul(n)), key=order.get), [up, down],
                                  f.num_experts)
    mms = mms or [n for n in cands if gu.val(n).shape[-1] > f.num_experts]  # also scoring a shared expert (Inkling)
    if len(mms) != 1:
        raise _Miss(f"expected one router product with {f.num_experts} outputs feeding the experts, "
                    f"found {len(mms)}")
    router = mms[0]
    x = _router_input(router)
    return router, x, feeds, table


def _router_input(router: fx.Node) -> fx.Node:
    """What the router product reads, before a dtype-only cast: a router that scores in float32 reads `x.float()`
    of the [T, d] value the experts read in the model's dtype (bf16 / fp16 models: DeepSeek, GLM-4-MoE, ERNIE)."""
    x = router.args[0] if router.target in gu.targets(aten.linear, aten.mm, aten.matmul) else router.args[1]
    while gu.is_cast(x):
        x = x.args[0]
    return x


def _fill_value(n) -> float | None:
    """The constant a fill op (full, full_like, zeros, ...) writes, else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    if n.target in _ZERO_FILLS:
        return 0.0
    i = _FILLS.get(getattr(n.target, "overloadpacket", None))
    value = n.args[i] if i is not None and len(n.args) > i else n.kwargs.get("fill_value")
    return float(value) if isinstance(value, (int, float, bool)) else None


def _is_swap(n: fx.Node) -> bool:
    """A transpose of the two dims of a 2-D value."""
    if n.op != "call_function" or gu.val(n) is None or gu.val(n).dim() != 2:
        return False
    if n.target in gu.targets(aten.t, aten.numpy_T):
        return True
    if n.target in gu.targets(aten.transpose):
        return sorted(a % 2 for a in n.args[1:3]) == [0, 1]
    return n.target in gu.targets(aten.permute) and [a % 2 for a in n.args[1]] == [1, 0]


def _match_batched(gm: fx.GraphModule, block: BlockInfo, region: set, up: fx.Node, down: fx.Node) -> MoEMatch:
    """Experts run for every token by two batched products over stacked weights (Llama 4):

        h = repeat(x, [E, 1]) * transpose(s).reshape(-1, 1)      # [E*T, d]: row e*T + t is x[t] * s[t, e]
        y = sum over e of down_e(act(gate_e(h_e)) * up_e(h_e))    # bmm over [E, T, d], then a sum over dim 0
        s = elementwise(scatter(fill(c), -1, routes, values))     # [T, E], zero off the chosen experts

    Each expert's input is scaled by its weight, and an unchosen expert's input is zero, so is its output
    (checked: no bias, act(0) finite for gated experts, act(0) = 0 for plain ones): y[t] equals the sum over the
    token's K chosen experts e of FFN_e(x[t] * s[t, e]). RaiseMoE runs exactly that: each (token, chosen expert)
    pair a row of one routed_ffn, E/K times fewer expert FLOPs than the captured model."""
    f, E = block.ffn, block.ffn.num_experts
    router, x, *_ = _router(region, f, up, down)
    lead = _shape(router)[:-1]
    if len(lead) != 1:
        raise _Miss(f"batched experts behind a router of shape {_shape(router)}; read for [tokens, E] only")
    x_root = gu.root_views(x)
    inp = gu.val(up.args[0])
    if inp is None or inp.dim() != 3 or str(inp.shape[0]) != str(E):
        raise _Miss(f"the batched experts' input is not [E={E}, tokens, d]")
    prod = gu.root_views(up.args[0])
    if prod.op != "call_function" or prod.target not in gu.targets(aten.mul) \
            or not all(isinstance(a, fx.Node) for a in prod.args[:2]):
        raise _Miss("the batched experts' input is not the block input times a weight per (expert, token)")
    a, b = prod.args[:2]
    rep, col = (a, b) if gu.root_views(a).target in gu.targets(aten.repeat) else (b, a)
    r = gu.root_views(rep)
    if r.target not in gu.targets(aten.repeat) or list(r.args[1]) != [E, 1] or gu.root_views(r.args[0]) is not x_root:
        raise _Miss("the batched experts' input is not the block input repeated once per expert")
    t, cv = gu.root_views(col), gu.val(col)
    if not _is_swap(t) or cv is None or cv.dim() != 2 or cv.shape[-1] != 1 \
            or str(cv.shape[0]) != str(gu.val(r).shape[0]) or _shape(t.args[0]) != _shape(router):
        raise _Miss("the batched experts' input is not scaled by a transposed [tokens, E] weight column")
    s = t.args[0]
    scatter = s
    while scatter.op == "call_function" and scatter.target not in gu.targets(aten.scatter) \
            and len(scatter.all_input_nodes) == 1:
        scatter = scatter.all_input_nodes[0]
    if scatter.target not in gu.targets(aten.scatter) or scatter.args[1] not in (1, -1):
        raise _Miss("the per-expert weights are not scattered from the chosen experts")
    base, _, routes = scatter.args[:3]
    c = _fill_value(base)
    if c is None or not (gu.is_getitem(routes) and routes.args[1] == 1 and routes.args[0].target in gu.TOPK):
        raise _Miss("the per-expert weights are not scattered from a top-k choice into a constant fill")
    try:
        off = c if s is scatter else float(elementwise_fn(scatter, s)(torch.tensor([c]))[0])
    except Exception as e:  # noqa: BLE001 - the scoring between the scatter and the weights is not elementwise
        raise _Miss(f"the per-expert weights are not elementwise in the scattered scores ({e})") from None
    if off != 0.0:
        raise _Miss(f"an unchosen expert's weight is {off}, not 0: every expert contributes")
    out = gu.forward_views(down)
    combine = next(iter(out.users)) if len(out.users) == 1 else None
    if combine is None or combine.target not in gu.targets(aten.sum) or _shape(out) != _shape(down) \
            or [d % 3 for d in combine.args[1]] != [0] or (len(combine.args) > 2 and combine.args[2]) \
            or _shape(combine) != _shape(x):
        raise _Miss("the batched experts' outputs are not summed over the expert dim")
    _, checks = _dispatch_nodes(region, combine, [s], x)   # nothing but x, s and the stacked weights reach it
    w = _weights(gm, up, down)
    act, F = w["activation"], w["F"]
    if any(w.get(k) is not None for k in ("b_up", "b_gate", "b_down", "b_experts")):
        raise _Miss("batched experts with biases: an unchosen expert's output is not zero")
    unit, z = get_activation(act), torch.zeros(1)
    at0 = float((unit(z) if w["w_gate"] is None else unit.glu(z, z))[0])
    if at0 != 0.0:
        raise _Miss(f"the experts' activation {act} gives {at0} at 0: an unchosen expert's output is not zero")
    if E * F != w["w_up"].shape[0]:
        raise _Miss(f"{w['w_up'].shape[0] // F} stacked experts, the router scores {E}")
    return MoEMatch(x, router, routes, s, combine, E, F, act, w["w_up"], w["w_gate"], w["w_down"],
                    weights_on_input=True, per_expert_gates=True, checks=_in_order(checks))


_ASSERTS = gu.targets(aten._assert_scalar, aten.sym_constrain_range_for_size, aten.sym_constrain_range,
                      aten._assert_async)


def _in_order(nodes: set) -> list:
    """`nodes` in graph order."""
    if not nodes:
        return []
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)}
    return sorted(nodes, key=order.get)


def _checks_only(n: fx.Node, found: set) -> bool:
    """Does `n` compute nothing but run-time checks on sizes (a size, a comparison, an assert: torch.export's
    checks on data-dependent sizes)? Adds `n` and what it feeds to `found` when it does."""
    if n.op != "call_function" or isinstance(n.meta.get("val"), torch.Tensor) and n.target not in _ASSERTS:
        return False
    if n.target not in _ASSERTS and not all(_checks_only(u, found) for u in n.users):
        return False
    found.add(n)
    return True


def _subgraph(gm: fx.GraphModule, x: fx.Node, outs: list) -> fx.GraphModule:
    """The nodes computing `outs` from `x` and the stored weights, as a module of x alone (its weights read from
    `gm`). A size read from elsewhere that equals one of x's sizes (a fill of [tokens, E] sized from the model's
    input) is read from x; anything else from another input of the graph raises `_Miss`."""
    g = fx.Graph()
    xv = gu.val(x)
    env = {x: g.placeholder("x")}
    before_x, after_x = gu.ancestors([x]), gu.descendants(x)

    def get(n):
        if n in env:
            return env[n]
        if isinstance(n.meta.get("val"), torch.SymInt) and n not in after_x:
            v = n.meta["val"]
            dims = [i for i, s in enumerate(xv.shape) if str(s) == str(v)]
            if not dims:
                raise _Miss(f"the expert dispatch reads the size {n.name} = {v}, which is none of its input's")
            env[n] = g.call_function(aten.sym_size.int, (env[x], dims[0]))
            return env[n]
        if n.op == "placeholder" or n in before_x:
            raise _Miss(f"the expert dispatch reads {n.name}, which is not computed from the block input")
        for a in n.all_input_nodes:
            get(a)
        env[n] = g.node_copy(n, lambda a: env[a])
        return env[n]

    g.output(tuple(get(o) for o in outs))
    return fx.GraphModule(gm, g)


def _probes(x: fx.Node, d: int, dtype) -> list[torch.Tensor]:
    """Inputs of x's rank for checking a dispatch: random tokens at two lengths, and one token repeated (every row
    choosing the same experts: capacity limits and load-dependent dropping show there)."""
    rank = gu.val(x).dim()
    g = torch.Generator().manual_seed(0)
    out = []
    for T, same in ((37, False), (64, False), (48, True)):
        v = torch.randn(1 if same else T, d, generator=g).expand(T, d) if same else torch.randn(T, d, generator=g)
        out.append(v.reshape(*([1] * (rank - 2)), T, d).to(dtype).contiguous())
    return out


def _match_per_expert(gm: fx.GraphModule, block: BlockInfo, region: set) -> MoEMatch:
    """Experts written as E dense FFN modules (`ffn.expert_ffns`): a loop gathering each expert's tokens and
    adding its weighted output back, or every expert on every token weighted afterwards, or anything else that
    computes the same. The combine is the first [tokens, d] value after every expert's output; the routes and gates
    are integer and floating [tokens, K] values from the router that reach it, the last pair (in graph order) for
    which the rewrite checks out: run on probe inputs (`_probes`, the captured weights), the dispatch must equal
    sum_k g_k FFN_{r_k}(x) (the gate on the output) or sum_k FFN_{r_k}(x g_k) (on the input); else the block is left
    as captured."""
    f = block.ffn
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    mms = sorted((n for n in region if gu.is_matmul(n)), key=order.get)
    routers = [n for n in mms if _shape(n) is not None and _shape(n)[-1] == str(f.num_experts)]
    if len(routers) != 1:
        raise _Miss(f"expected one router product with {f.num_experts} outputs, found {len(routers)}")
    router = routers[0]
    x = _router_input(router)
    dyn = gu.dynamic_nodes(gm.graph)
    try:
        experts, *_ = expert_ffns(gm, mms, region, dyn, router, f.num_experts)
    except Exception as e:  # the reader's miss: its message is the reason
        raise _Miss(str(e)) from None
    combine = first_after([e.out for e in experts], region, _shape(x))
    if combine is None:
        raise _Miss(f"no [tokens, d] value after every expert's output (x is {_shape(x)})")
    lead, k = _shape(router)[:-1], str(f.top_k)
    feeds = gu.ancestors([combine])
    after = sorted((n for n in region & gu.descendants(router) & feeds
                    if _shape(n) is not None and _shape(n)[:-1] == lead and _shape(n)[-1] == k), key=order.get)
    ints = [n for n in after if not gu.val(n).is_floating_point() and gu.val(n).dtype != torch.bool]
    floats = [n for n in after if gu.val(n).is_floating_point()]
    if not ints or not floats:
        raise _Miss("no [tokens, k] expert ids and gate weights from the router reach the experts' sum")
    # the weights as one routed_ffn's, expert e = range e
    cat = lambda refs, dim=0: None if refs[0] is None else torch.cat(  # noqa: E731
        [resolve_weight(gm, r) for r in refs], dim=dim).contiguous()
    w_up, w_gate = cat([e.up for e in experts]), cat([e.gate for e in experts])
    w_down = cat([e.down for e in experts], dim=1)
    b_up, b_gate = cat([e.b_up for e in experts]), cat([e.b_gate for e in experts])
    b_down = b_experts = None
    if experts[0].b_down is not None:
        bs = [resolve_weight(gm, e.b_down) for e in experts]
        if all(torch.equal(b, bs[0]) for b in bs):
            b_down = bs[0].contiguous()        # one bias for every route: routed_ffn adds it
        else:
            b_experts = torch.stack(bs).contiguous()   # [E, d]: looked up per route and added after the op
    E, F = len(experts), w_up.shape[0] // len(experts)
    act = block.ffn.activation
    ranges = [v for e in range(E) for v in (e * F, (e + 1) * F)]
    # the check: the captured dispatch against both readings on probes, for the candidate ids and gates from the last
    ints, floats = ints[-8:], floats[-32:]
    sub = _subgraph(gm, x, [combine, *ints, *floats])
    d = w_up.shape[1]
    try:
        with torch.no_grad():
            runs = [(p.reshape(-1, d), sub(p)) for p in _probes(x, d, w_up.dtype)]
            args = (w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, act)
            found = next(((i, j, fits) for i in reversed(range(len(ints))) for j in reversed(range(len(floats)))
                          if any((fits := _readings_fit(runs, i, j, len(ints), args, b_experts)).values())), None)
    except Exception as e:  # noqa: BLE001 - model code that does not run on the probes: no reading to check
        raise _Miss(f"the expert dispatch could not be checked on probe inputs ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if found is None:
        raise _Miss("the expert dispatch computes neither sum_k g_k FFN_k(x) nor sum_k FFN_k(x g_k) on probe "
                    "inputs (capacity limits, per-expert scaling or another combine)")
    i, j, fits = found
    routes, gates = ints[i], floats[j]
    # nothing outside reads the replaced dispatch (what it reads was checked on the probes)
    _, checks = _dispatch_nodes(region, combine, [routes, gates], x, reads=False)
    return MoEMatch(x, router, routes, gates, combine, E, F, act, w_up, w_gate, w_down,
                    weights_on_input=not fits["output"], b_up=b_up, b_gate=b_gate, b_down=b_down, b_experts=b_experts,
                    checks=_in_order(checks))


def _readings_fit(runs: list, i: int, j: int, n_ints: int, args: tuple, b_experts) -> dict[str, bool]:
    """Does the captured dispatch's output equal routed_ffn's reference with the i-th candidate ids and the j-th
    candidate gates, the gates on the outputs ("output") or on the inputs ("input"), on every probe run?"""
    fits = {"output": True, "input": True}
    for xs, (y, *cands) in runs:
        d = xs.shape[-1]
        r, gt = cands[i], cands[n_ints + j]
        K = r.shape[-1]
        r, gt, y = r.reshape(-1, K).long(), gt.reshape(-1, K), y.reshape(-1, d)
        if r.min() < 0 or r.max() >= len(args[6]) // 2:
            return {"output": False, "input": False}
        tol = _tolerance(xs.dtype, y)
        on_out = routed_ffn_reference(xs, r, gt.to(xs.dtype), *args)
        rows = (xs[:, None, :] * gt[..., None].to(xs.dtype)).reshape(-1, d)
        on_in = routed_ffn_reference(rows, r.reshape(-1, 1), None, *args).reshape(-1, K, d).sum(1)
        if b_experts is not None:
            on_out = on_out + (b_experts[r] * gt[..., None].to(xs.dtype)).sum(1)
            on_in = on_in + b_experts[r].sum(1)
        fits["output"] &= bool((on_out - y).abs().max() <= tol)
        fits["input"] &= bool((on_in - y).abs().max() <= tol)
        if not any(fits.values()):
            break
    return fits


def _tolerance(dtype: torch.dtype, y: torch.Tensor) -> float:
    """How far a reading may be from the captured dispatch's output y on a probe: fp32 experts, 200 ulps of y's
    dtype (at least of magnitude 1: sums in another order); bf16 / fp16 experts, 4 ulps of their dtype relative to
    y's magnitude (each expert's output rounds to that dtype where the two sum them in another order; a wrong
    reading is off by the order of y itself)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 4 * torch.finfo(dtype).eps * float(y.abs().max())
    return 200 * torch.finfo(y.dtype).eps * max(1.0, float(y.abs().max()))


def match_moe(gm: fx.GraphModule, block: BlockInfo) -> MoEMatch:
    """The dispatch of `block`'s MoE FFN; raises `_Miss` with the reason when it cannot be expressed."""
    f = block.ffn
    region = set(block.ffn_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    grouped = sorted((n for n in region if gu.is_grouped_mm(n)), key=order.get)
    if not grouped:
        batched = batched_experts(gm, [n for n in gm.graph.nodes if n in region])
        if len(batched) == 2:
            return _match_batched(gm, block, region, *batched)
        if not batched:
            return _match_per_expert(gm, block, region)
    if len(grouped) != 2:
        raise _Miss(f"expected the experts as a pair of grouped GEMMs (up, down), found {len(grouped)} "
                    "(per-expert loops are not read)")
    up, down = grouped
    router, x, feeds, table = _router(region, f, up, down)
    lead = _shape(router)[:-1]
    from_router = gu.descendants(router)
    # token-mixing dispatch steps (a sort of the flattened expert ids): values after them are in sorted order,
    # even where their shape looks per-token ([T, 1] when k = 1)
    mixed = set().union(*(gu.descendants(n) for n in region & from_router
                          if n.target in _SORTS and gu.val(n.args[0]) is not None and gu.val(n.args[0]).dim() == 1))
    after = sorted((n for n in region & from_router - mixed if _shape(n) is not None and _shape(n)[:-1] == lead
                    and _shape(n)[-1] == str(f.top_k)), key=order.get)
    ints = [n for n in after if not gu.val(n).is_floating_point() and gu.val(n).dtype != torch.bool and n in feeds]
    ints = ints or ([table] if table is not None else [])     # hash routing: the ids from elsewhere
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

    # The replaced dispatch: what reaches the combine from the experts' input, routes and gates, and nothing else.
    xe = _experts_input(region, up, x, router, from_router, order)
    replaced, checks = _dispatch_nodes(region, combine, [routes, gates], xe)
    x_root = gu.root_views(xe)
    if gu.root_views(up.args[0]) not in replaced and gu.root_views(up.args[0]) is not x_root:
        raise _Miss("the experts read neither the router's input nor another value of its shape before them")
    w = _weights(gm, up, down)
    F = w["F"]
    # The router may score more than the stacked experts (Inkling scores its shared expert too and chooses among
    # the first E): the grouped-GEMM dispatch gives an id >= E no expert (transformers' sentinel), as routed_ffn
    # does with an id outside its ranges.
    E = w["w_up"].shape[0] // F
    if E * F != w["w_up"].shape[0] or E > f.num_experts:
        raise _Miss(f"{w['w_up'].shape[0] / F:g} stacked experts, the router scores {f.num_experts}")
    return MoEMatch(x, router, routes, gates, combine, E, F, w["activation"], w["w_up"], w["w_gate"],
                    w["w_down"], b_up=w["b_up"], b_gate=w["b_gate"], b_down=w.get("b_down"),
                    b_experts=w.get("b_experts"), checks=_in_order(checks),
                    x_experts=None if gu.root_views(xe) is gu.root_views(x) else xe)


def _experts_input(region: set, up: fx.Node, x: fx.Node, router: fx.Node, from_router: set, order: dict) -> fx.Node:
    """The [T, d] value the experts' first grouped product reads (gathered in route order): x, the router's input,
    in most models; else the last value of x's shape before the product that neither the router reads nor
    depends on the routes (`from_router`: the router's descendants; Gemma 4 feeds its experts another norm of the
    block input than its router)."""
    cands = [n for n in (gu.ancestors([up.args[0]]) & region) - from_router - gu.ancestors([router]) - {router}
             if n.op == "call_function" and _shape(n) == _shape(x)]
    return max(cands, key=order.get) if cands else x


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


def _input_weighted(g: fx.Graph, m: MoEMatch, routes: fx.Node, w: dict, ranges: list) -> tuple[fx.Node, fx.Node]:
    """(routed_ffn, the [T, d] sum replacing the combine) for batched experts: each (token, chosen expert) pair is
    one row, x[t] * s[t, e] routed to expert e with no output gate; the K rows of a token are summed."""
    K = int(gu.val(routes).shape[-1])
    d = int(gu.val(m.x).shape[-1])
    weight = g.call_function(aten.gather.default, (m.gates, -1, routes)) if m.per_expert_gates else m.gates  # [T, K]
    rows = g.call_function(aten.mul.Tensor, (g.call_function(aten.unsqueeze.default, (m.x, -2)),
                                             g.call_function(aten.unsqueeze.default, (weight, -1))))  # [T, K, d]
    rows = g.call_function(aten.reshape.default, (rows, [-1, d]))
    ids = g.call_function(aten.reshape.default, (routes, [-1, 1]))
    op = g.call_function(gu.ROUTED_FFN, (rows, ids, None, w["up"], w.get("gate"), w["down"], w.get("b_up"),
                                         w.get("b_gate"), w.get("b_down"), ranges, m.activation))
    op.meta[MOE_TOP_K] = K
    out = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.reshape.default, (op, [-1, K, d])), [1]))
    return op, out


def _add_expert_biases(g: fx.Graph, gm: fx.GraphModule, m: MoEMatch, routes: fx.Node, out: fx.Node, key: str
                       ) -> fx.Node:
    """out + each token's chosen experts' own down biases: sum_k g_k b[r_k] (gates on the outputs) or sum_k b[r_k]
    (on the inputs)."""
    table = weight_node(g, WeightRef(add_tensor_attr(gm, f"routefx_{key}_experts_b_down", m.b_experts)))
    bias = g.call_function(aten.embedding.default, (table, routes))                        # [T, K, d]
    if not m.weights_on_input:
        gates = g.call_function(aten.to.dtype, (m.gates, m.b_experts.dtype))
        bias = g.call_function(aten.mul.Tensor, (bias, g.call_function(aten.unsqueeze.default, (gates, -1))))
    return g.call_function(aten.add.Tensor, (out, g.call_function(aten.sum.dim_IntList, (bias, [-2]))))


class RaiseMoE(Pass):
    name = "raise_moe"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        res = PassResult()
        g = gm.graph
        batched = 0
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
                for name, t in (("up", m.w_up), ("gate", m.w_gate), ("down", m.w_down), ("b_up", m.b_up),
                                ("b_gate", m.b_gate), ("b_down", m.b_down)):
                    if t is not None:
                        w[name] = weight_node(g, WeightRef(add_tensor_attr(gm, f"routefx_{key}_experts_{name}", t)))
                ranges = [v for e in range(m.experts) for v in (e * m.width, (e + 1) * m.width)]
                if m.weights_on_input:
                    op, out = _input_weighted(g, m, routes, w, ranges)
                    batched += 1
                else:
                    gates = m.gates
                    if gu.val(gates).dtype != gu.val(m.inp).dtype:
                        gates = g.call_function(aten.to.dtype, (gates, gu.val(m.inp).dtype))
                    op = out = g.call_function(gu.ROUTED_FFN, (
                        m.inp, routes, gates, w["up"], w.get("gate"), w["down"], w.get("b_up"), w.get("b_gate"),
                        w.get("b_down"), ranges, m.activation))
                    op.meta[MOE_TOP_K] = int(gu.val(routes).shape[-1])
                if m.b_experts is not None:
                    out = _add_expert_biases(g, gm, m, routes, out, key)
            op.meta["nn_module_stack"] = m.combine.meta.get("nn_module_stack", {})
            op.meta["routefx_path"] = f.path
            m.combine.replace_all_uses_with(out)
            for n in reversed(m.checks):   # checks on the replaced dispatch's sizes: what kept it alive
                g.erase_node(n)
            res.rewrites += 1
        if res.rewrites:
            res.notes.append(f"{res.rewrites} MoE block(s) dispatch their experts through routed_ffn; shared "
                             "experts stay dense FFNs added after it")
        if batched:
            res.notes.append(f"{batched} MoE block(s) ran every expert on every token (batched products, the "
                             "unchosen experts' inputs weighted 0); routefx runs each token's chosen experts only")
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
