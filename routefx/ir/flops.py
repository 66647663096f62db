"""FLOP accounting from the graph: 2 FLOPs per multiply-add of every matrix product.

Counted: linear / mm / addmm / matmul / bmm / einsum (projections, LM head, routers, eager attention), grouped expert
GEMMs (each row times its one expert), scaled-dot-product attention (scores and weighted sum: 2·L·S_k·(Dq+Dv)
per head, where a causal op counts (S+1)/2 keys per query on average and a sliding window w counts min(i, w)
keys for query i), and `routed_ffn` per route (2·d·|range| per product: 3 products gated, 2 plain).
Not counted: norms, softmax, activations, bias adds and other element-wise ops, embedding lookups.

Counts are sympy expressions in the sequence length `S` (per token: the part of a count that grows with the batch,
divided by batch × sequence; work done once per call whatever the batch, like a rotary table, is left out), so
attention's growth is explicit; `.at(S)` evaluates them. Batch and sequence symbols are read from the inputs'
dims by position, never by name (torch releases name them differently).
"""
from __future__ import annotations

import dataclasses
import functools

import sympy
import torch
from torch import fx

from routefx.errors import CalibrationError, UnsupportedModelError
from routefx.ir import graph_utils as gu
from routefx.ir.attention import attention_masks
from routefx.ir.model_ir import ModelIR

aten = torch.ops.aten
S = sympy.Symbol("S", positive=True, integer=True)
_B = sympy.Symbol("B", positive=True, integer=True)

__all__ = ["S", "FlopCount", "BlockFlops", "count_flops", "route_flops", "dynamic_routed", "realised_flops",
           "data_dependent_symbols", "dim_expr"]


@dataclasses.dataclass
class BlockFlops:
    index: int
    path: str | None
    attention: sympy.Expr       # per token, attention branch (projections + scores)
    ffn: sympy.Expr             # per token, FFN branch (for routed FFNs: at the routes fixed in the graph)

    @property
    def total(self) -> sympy.Expr:
        return self.attention + self.ffn


@dataclasses.dataclass
class FlopCount:
    """FLOPs per token, as expressions in S."""

    blocks: list[BlockFlops]
    other: sympy.Expr           # outside the blocks: LM head, pooler, ...
    dynamic_routes: bool        # some routed_ffn takes data-dependent routes (its count here is the big route)

    @property
    def total(self) -> sympy.Expr:
        return _simplify(self.other + sum((b.total for b in self.blocks), sympy.Integer(0)))

    def at(self, seq: int) -> dict:
        ev = lambda e: float(sympy.sympify(e).subs(S, seq))  # noqa: E731
        return {"S": seq, "total": ev(self.total), "other": ev(self.other),
                "blocks": [{"index": b.index, "path": b.path, "attention": ev(b.attention), "ffn": ev(b.ffn)}
                           for b in self.blocks]}


@functools.lru_cache(maxsize=4096)
def _simplify(e: sympy.Expr) -> sympy.Expr:
    """sympy.simplify, kept: a model's layers repeat the same counts (and a sliding window's Piecewise is slow to
    simplify), and a compile counts its graph twice, before and after its passes."""
    return sympy.simplify(e)


def _sym(dim, subs) -> sympy.Expr:
    if isinstance(dim, int):
        return sympy.Integer(dim)
    return dim_expr(dim).subs(subs)


def dim_expr(dim) -> sympy.Expr:
    """The sympy expression of a symbolic dim, with the shape environment's known equalities applied (torch
    releases differ in whether `node.expr` already applies them)."""
    expr = sympy.sympify(dim.node.expr)
    env = getattr(dim.node, "shape_env", None)
    return sympy.sympify(env.replace(expr)) if env is not None and hasattr(env, "replace") else expr


def _numel(shape, subs) -> sympy.Expr:
    out = sympy.Integer(1)
    for s in shape:
        out *= _sym(s, subs)
    return out


def _keys_per_query(seq: sympy.Expr, causal: bool, window: int | None) -> sympy.Expr:
    if not causal:
        return seq
    if window is None:
        return (seq + 1) / 2
    w = sympy.Integer(window)
    return sympy.Piecewise(((seq + 1) / 2, seq <= w), ((w * (w + 1) / 2 + (seq - w) * w) / seq, True))


def route_flops(n: fx.Node) -> list[int]:
    """Per-token FLOPs of each route of a routed_ffn node (0 for an empty range)."""
    x, _, _, w_up, w_gate, _, _, _, _, ranges, _ = n.args
    d = int(gu.val(w_up).shape[1])
    products = 3 if w_gate is not None else 2
    return [2 * d * (ranges[i + 1] - ranges[i]) * products for i in range(0, len(ranges), 2)]


def _node_flops(n: fx.Node, subs, masks) -> tuple[sympy.Expr, bool]:
    """Total FLOPs (in B, S) of one node, and whether it is a routed op with data-dependent routes."""
    t = n.target
    out = gu.val(n)
    if gu.is_routed(n):
        x = gu.val(n.args[0])
        K = int(gu.val(n.args[1]).shape[-1])
        per = route_flops(n)
        r = gu.constant_route(n.args[1])
        tokens = _numel(x.shape[:-1], subs)
        return tokens * K * (per[r] if r is not None else max(per)), r is None
    if t in gu.ATTENTION:
        q, k, v = (gu.val(a) for a in n.args[:3])
        m = masks.get(n)
        keys = _keys_per_query(_sym(k.shape[-2], subs), m.causal if m else False, m.window if m else None)
        rows = _numel(q.shape[:-1], subs)
        return 2 * rows * keys * (_sym(q.shape[-1], subs) + _sym(v.shape[-1], subs)), False
    if t in gu._targets(aten.linear):
        return 2 * _numel(out.shape, subs) * _sym(gu.val(n.args[1]).shape[-1], subs), False
    if t in gu._targets(aten.addmm, aten.baddbmm):
        return 2 * _numel(out.shape, subs) * _sym(gu.val(n.args[1]).shape[-1], subs), False
    if t in gu._targets(aten.mm, aten.bmm, aten.matmul) or gu.is_grouped_mm(n):
        return 2 * _numel(out.shape, subs) * _sym(gu.val(n.args[0]).shape[-1], subs), False
    if t in gu.EINSUM:
        return _einsum_flops(n, subs), False
    return sympy.Integer(0), False


def _einsum_flops(n: fx.Node, subs) -> sympy.Expr:
    """2 FLOPs per multiply-add of an einsum, contracted pairwise left to right as torch does: each pair costs the
    product of the sizes of every index either operand holds (an index summed in one operand alone is a sum, not
    counted). An ellipsis stands for the operands' leading dims, right-aligned and broadcast."""
    terms, out = gu.einsum_equation(n)
    vals = [gu.val(a) for a in gu.product_operands(n)]
    if len(terms) != len(vals) or any(v is None for v in vals):
        raise UnsupportedModelError(f"node {n.name}: einsum '{n.args[0]}' on {len(vals)} operand(s) of "
                                    f"{'unknown shapes' if len(terms) == len(vals) else 'another count'}")
    size: dict = {}
    letters = []
    for term, v in zip(terms, vals):
        if "..." in term:  # the k dims an ellipsis covers, named from the right so that operands broadcast
            k = v.dim() - (len(term) - 3)
            term = term.replace("...", "".join(chr(0x100 + k - 1 - i) for i in range(k)))
        letters.append(term)
        for c, d in zip(term, v.shape):
            if size.get(c, sympy.Integer(1)) == 1:   # a broadcast dim of size 1 takes the other operand's size
                size[c] = _sym(d, subs)
    keep = set(out) | {c for c in size if ord(c) >= 0x100}
    # an index that one operand holds alone and the output drops is summed out first, no product
    letters = [{c for c in t if c in keep or any(c in u for j, u in enumerate(letters) if j != i)}
               for i, t in enumerate(letters)]
    total, acc = sympy.Integer(0), letters[0] if letters else set()
    for i in range(1, len(letters)):
        pair = acc | set(letters[i])
        total += 2 * sympy.Mul(*(size[c] for c in pair))
        later = set().union(*letters[i + 1:])
        acc = {c for c in pair if c in keep or c in later}
    return total


def _batch_seq(gm: fx.GraphModule) -> dict:
    """Shape symbol -> B or S, read from the placeholders by position (dim 0 batch, dim 1 sequence), never by
    name: every input has its own symbols in some torch releases, and the names differ between releases."""
    subs: dict = {}
    for n in gm.graph.nodes:
        v = gu.val(n) if n.op == "placeholder" else None
        if v is None or v.dim() < 1:
            continue
        for dim, sym in zip(v.shape[:2], (_B, S)):
            if not isinstance(dim, int):
                e = dim_expr(dim)
                if isinstance(e, sympy.Symbol):
                    subs.setdefault(e, sym)
    return subs


def _token_dims(gm: fx.GraphModule, subs: dict) -> tuple:
    """(batch, sequence) of the first input: the symbols B and S where the graph keeps them dynamic, the sizes
    where it was specialised to them (a static torch.compile piece; a batch of 1)."""
    for n in gm.graph.nodes:
        v = gu.val(n) if n.op == "placeholder" else None
        if v is None or v.dim() < 1:
            continue
        dims = []
        for dim, sym in zip(v.shape[:2], (_B, S)):
            dims.append(int(dim) if isinstance(dim, int) else subs.get(dim_expr(dim), sym))
        return dims[0], (dims[1] if len(dims) > 1 else S)
    return _B, S


def _per_token(total: sympy.Expr, where: str, batch=_B, seq=S, sizes: dict | None = None) -> sympy.Expr:
    """FLOPs per token of a total in B and S: the part that grows with the batch, divided by B·S. Work done
    once per call whatever the batch (a rotary table from the positions) is not per-token work. Where the graph
    was specialised to a batch size or length, the total is divided by that size instead (the count then holds
    for that size only; once-per-call work is spread over the tokens). A total that depends on other symbols (a
    data-dependent size: the rows an expert receives) is counted at the sizes of one run, `sizes` (shape symbol
    -> size, B and S included), as a constant per token."""
    total = sympy.expand(total)
    rest = total.free_symbols - {_B, S}
    if rest and sizes is not None and rest <= sizes.keys() and {_B, S} <= sizes.keys():
        return sympy.nsimplify(total.subs(sizes) / (sizes[_B] * sizes[S]))
    if rest:
        raise UnsupportedModelError(f"FLOPs of {where} depend on shape symbols {sorted(map(str, rest))} that are "
                                    "neither the batch nor the sequence length of an input; routefx counts "
                                    "models whose dynamic dims are the inputs' batch and sequence, and counts "
                                    "data-dependent sizes on an example run (count_flops(..., sizes=))")
    growing = total.coeff(_B, 1) if batch is _B else total / batch
    return _simplify(growing / seq)


def count_flops(gm: fx.GraphModule, ir: ModelIR, sizes: dict | None = None) -> FlopCount:
    """Per-token FLOPs of `gm`, split by block (attention / FFN) and the rest. `sizes` ({torch shape symbol:
    size} of one run, `data_dependent_sizes`) counts the nodes whose sizes depend on the data at that run."""
    subs = _batch_seq(gm)
    tokens = _token_dims(gm, subs)
    if sizes is not None:  # in B and S, as the counts are
        sizes = {**sizes, **{subs[k]: v for k, v in sizes.items() if k in subs}}
        for sym, dim in zip((_B, S), tokens):
            if isinstance(dim, int):
                sizes[sym] = dim
    masks = attention_masks(gm)
    owner: dict[fx.Node, tuple[int, str]] = {}
    for b in ir.blocks:
        for n in b.nodes:
            owner[n] = (b.index, "ffn" if n in b.ffn_nodes else "attention")
    blocks = [BlockFlops(b.index, b.path, sympy.Integer(0), sympy.Integer(0)) for b in ir.blocks]
    other = sympy.Integer(0)
    dynamic = False
    for n in gm.graph.nodes:
        if n.op != "call_function" or not (gu.is_matmul(n) or n.target in gu.ATTENTION):
            continue
        f, dyn = _node_flops(n, subs, masks)
        dynamic |= dyn
        f = _per_token(f, f"node {n.name} ({n.target})", *tokens, sizes=sizes)
        if n in owner:
            i, part = owner[n]
            setattr(blocks[i], part, getattr(blocks[i], part) + f)
        else:
            other += f
    for b in blocks:
        b.attention, b.ffn = _simplify(b.attention), _simplify(b.ffn)
    return FlopCount(blocks, _simplify(other), dynamic)


def data_dependent_symbols(gm: fx.GraphModule) -> set:
    """The shape symbols of matrix products and attention ops that are neither an input's batch nor its
    sequence (sizes only a run can tell: the rows a MoE expert receives after a data-dependent split)."""
    known = set(_batch_seq(gm))
    found = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and (gu.is_matmul(n) or n.target in gu.ATTENTION):
            for a in (n, *n.all_input_nodes):
                v = a.meta.get("val")
                if isinstance(v, torch.Tensor):
                    found |= {e for d in v.shape if not isinstance(d, int) for e in dim_expr(d).free_symbols}
    return found - known


def dynamic_routed(gm: fx.GraphModule, flops: FlopCount) -> list[fx.Node]:
    """The routed_ffn nodes whose route ids must be observed to count realised FLOPs."""
    return [n for n in gm.graph.nodes if gu.is_routed(n)] if flops.dynamic_routes else []


def realised_flops(flops: FlopCount, observed) -> float:
    """Mean FLOPs per real token: the static count at each batch's length, with every data-dependent routed_ffn
    counted at the routes its tokens took. `observed` yields, per batch, (mask [B, S] bool of real tokens,
    {routed node: route ids [B, S, K]}) for the nodes of `dynamic_routed`."""
    total, tokens = 0.0, 0
    for mask, routes in observed:
        n_tok = int(mask.sum())
        per_token = flops.at(int(mask.shape[-1]))["total"]
        for n, r in routes.items():
            per = torch.tensor(route_flops(n), dtype=torch.float64)   # counted on the host: route ids come to CPU
            real = per[r.reshape(-1, r.shape[-1]).cpu()].sum(-1)[mask.reshape(-1).cpu()]   # [real tokens]
            per_token += real.sum().item() / max(n_tok, 1) - max(route_flops(n)) * r.shape[-1]
        total += per_token * n_tok
        tokens += n_tok
    if tokens == 0:
        raise CalibrationError("no real token in the batches (every attention_mask is 0)")
    return total / tokens
