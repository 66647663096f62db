"""FFN classification: what a residual branch computes, read from its graph region.

Canonical forms (d = hidden, F = neurons):
  gated: act(x·Wgᵀ + bg) ⊙ (x·Wuᵀ + bu) · Wdᵀ + bd   -- two input products, or one fused [2F, d] split in halves
  mlp:   act(x·Wuᵀ + bu) · Wdᵀ + bd                   -- includes GPT-2's Conv1D (addmm with an [in, out] weight)
  moe:   a top-k router over experts, optionally a shared expert; the experts either as the grouped-GEMM pair
         transformers exports, or batched: two batched products over stacked [E, in, out] weights that run every
         expert on every token (Llama 4), the routing weights zeroing the experts a token did not choose
The activation is identified by *evaluating* the ops between the products on CPU probe values (whatever the
model's device; of the model they read only the learned scalars of a parametrised activation, copied to CPU once)
and comparing with the registry (so `F.gelu(x, approximate="tanh")`
and GPT-2's hand-written tanh formula both read gelu_tanh). A gated unit is evaluated on a grid of (gate, up) pairs
and factored into its two sides; the probes include points around every constant of the ops, so that clamps show,
and such units read as parametrised names (`routefx.ir.activations.ActivationSpec`).
Anything else is kind "unknown" with the reason.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import fx

from routefx.ir import graph_utils as gu
from routefx.ir.activations import ACTIVATIONS, Activation, ActivationSpec
from routefx.ir.graph_utils import fetch_attr as fetch
from routefx.ir.model_ir import DenseFFNMatch, FFNInfo, WeightRef

aten = torch.ops.aten
__all__ = ["analyse_ffn", "fetch", "resolve_weight", "param_ref", "stacked_weight", "batched_experts",
           "elementwise_fn", "identify_activation", "identify_glu", "expert_ffns", "expert_epilogue",
           "first_after", "table_routes"]


# meta key of a routed_ffn that RaiseMoE made from batched experts: its rows are (token, chosen expert) pairs with one
# route each and no gates; the value is the top-k per token
MOE_TOP_K = "routefx_moe_top_k"


class _Miss(Exception):
    """A pattern did not match; the message is the reason reported in `FFNInfo.reason`."""


def resolve_weight(gm: torch.nn.Module, ref: WeightRef) -> torch.Tensor:
    """The [out, in] matrix (or bias vector) `ref` stands for, as a view of the stored tensor."""
    w = fetch(gm, ref.target)
    if ref.index is not None:
        w = w[ref.index]
    if ref.transposed:
        w = w.t()
    if ref.rows is not None:
        w = w[ref.rows[0]:ref.rows[1]]
    return w


def param_ref(n, dyn: set, casts: bool = False) -> WeightRef:
    """Follow a weight operand back to its get_attr, counting transposes; with `casts`, through dtype-only casts
    too (a router that scores in float32 reads `weight.float()`: its weight's values, in another dtype; only for
    products the rewrites keep as captured, since the ref does not carry the dtype)."""
    flips, rows, index = 0, None, None
    while isinstance(n, fx.Node) and n.op == "call_function":
        if n in dyn:
            raise _Miss(f"weight operand {n.name} depends on the model inputs")
        if index is not None and not gu.is_identity(n):
            raise _Miss(f"weight computed by {n.target} from a stacked parameter's slice")
        if n.target is aten.slice.Tensor and flips == 0 and rows is None and n.args[1] == 0 \
                and (len(n.args) < 5 or n.args[4] == 1):
            rows = (int(n.args[2]), int(n.args[3]))
            n = n.args[0]
        elif gu.is_identity(n) or n.target in gu.VIEWS or (casts and gu.is_cast(n)):
            n = n.args[0]
        elif n.target is aten.select.int and n.args[1] == 0 and isinstance(n.args[2], int):
            index, n = n.args[2], n.args[0]     # w[e] of a stacked [E, ...] parameter
        elif n.target in gu.TRANSPOSES:
            if n.target in gu._targets(aten.permute) and list(n.args[1]) not in ([1, 0], [-1, -2]):
                raise _Miss(f"weight permuted by {n.args[1]}")
            flips += 1
            n = n.args[0]
        else:
            raise _Miss(f"weight computed by {n.target} rather than read from a parameter")
    if not isinstance(n, fx.Node) or n.op != "get_attr":
        raise _Miss("weight operand is not a parameter")
    if index is not None and index < 0:
        index += fetch(n.graph.owning_module, n.target).shape[0]
    return WeightRef(n.target, transposed=bool(flips % 2), rows=rows, index=index)


def _einsum_operands(m: fx.Node) -> tuple:
    """(data, weight, whether the weight is stored [in, out]) of an einsum that is a per-token linear map: two
    operands, the weight with two indices, one of them the data's last index (summed), the other the output's
    last, the output the data's other indices in order ('bsd,fd->bsf', '...d,df->...f')."""
    terms, out = gu.einsum_equation(m)
    ops = gu.product_operands(m)
    if len(ops) != 2 or len(terms) != 2:
        raise _Miss(f"einsum '{m.args[0]}' is not a two-operand product")
    for i in (0, 1):
        data, w = terms[i], terms[1 - i]
        named = data.removeprefix("...")
        if len(w) != 2 or "." in w + named or not named or named[-1] not in w or len(set(named)) != len(named):
            continue
        c, f = data[-1], w.replace(data[-1], "", 1)
        if f and f not in data and out == data[:-1] + f:
            return ops[i], ops[1 - i], w == c + f
    raise _Miss(f"einsum '{m.args[0]}' is not a per-token linear map of its data's last dim")


def _operands(m: fx.Node, dyn: set, router: bool = False):
    """(data, weight ref as [out, in], bias ref) of a weight product (`router`: one kept as captured, whose weight
    may be read through a dtype cast: `param_ref`)."""
    t, a = m.target, m.args
    if t in gu._targets(aten.linear):
        data, w, b = a[0], a[1], a[2] if len(a) > 2 else None
        ref = param_ref(w, dyn, router)
    elif t in gu._targets(aten.addmm):
        b, data, w = a[0], a[1], a[2]
        ref = param_ref(w, dyn, router)
        ref = WeightRef(ref.target, not ref.transposed, index=ref.index)
    elif t in gu._targets(aten.mm, aten.matmul):
        data, w, b = a[0], a[1], None
        ref = param_ref(w, dyn, router)
        ref = WeightRef(ref.target, not ref.transposed, index=ref.index)
    elif t in gu.EINSUM:
        data, w, transposed = _einsum_operands(m)
        b, ref = None, param_ref(w, dyn, router)
        if transposed and ref.rows is not None:
            raise _Miss(f"einsum '{a[0]}' reads a slice of a weight stored [in, out]")
        ref = WeightRef(ref.target, ref.transposed != transposed, rows=ref.rows, index=ref.index)
    else:
        raise _Miss(f"matrix product {t} is not a weight product")
    if isinstance(b, fx.Node):
        b = param_ref(b, dyn, router)
    return data, ref, b


def _anc_in(n: fx.Node, region: set) -> set:
    """Ancestors of n reached through region nodes only."""
    seen, stack = set(), [a for a in n.all_input_nodes if a in region]
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(a for a in m.all_input_nodes if a in region)
    return seen


def elementwise_fn(src, dst: fx.Node):
    """The ops from `src` (a node, or a tuple of nodes: the function's arguments in that order) to `dst` as a
    function of those alone (a GraphModule), for evaluating on a CPU probe; values computed from weights alone that
    the ops read (an activation's learned scalars) are evaluated once and kept in the function as CPU buffers
    (`fn.learned`: the one-element ones' values). Raises `_Miss` when an op between them reads anything else."""
    srcs = src if isinstance(src, tuple) else (src,)
    g = fx.Graph()
    env = {s: g.placeholder(f"x{i}") for i, s in enumerate(srcs)}
    region = set().union(*(gu.between(s, dst) for s in srcs)) | {dst}
    order = [n for n in dst.graph.nodes if n in region and n not in env]
    weights: set | None = None         # the graph's weight-only nodes, found when an op reads a value outside
    root, learned = torch.nn.Module(), {}   # weight-only values it reads, as CPU buffers of the function's module

    def const(a):
        if a not in env:
            if a.op == "get_attr":
                v = gu.fetch_attr(dst.graph.owning_module, a.target)
            else:
                for i in a.all_input_nodes:
                    const(i)
                v = a.target(*fx.node.map_arg(a.args, learned.get), **fx.node.map_arg(a.kwargs, learned.get))
            learned[a] = v
            name = f"c{len(learned)}"
            if isinstance(v, torch.Tensor):
                root.register_buffer(name, v.detach().cpu())
            else:
                setattr(root, name, v)
            env[a] = g.get_attr(name)

    for n in order:
        if n.op != "call_function":
            raise _Miss(f"activation reads {n.op} {n.name}")
        outside = [a for a in n.all_input_nodes if a not in env]
        if outside and weights is None:
            weights = gu.weight_only_nodes(dst.graph) if dst.graph.owning_module is not None else set()
        bad = [a for a in outside if a not in weights]
        if bad:
            raise _Miss(f"activation op {n.name} reads {bad[0].name}, which is not elementwise on the FFN")
        for a in outside:
            const(a)
        if n.target in gu.VIEWS:
            env[n] = env[n.args[0]]
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[dst])
    fn = fx.GraphModule(root, g)
    fn.ops = [str(n.target) for n in order]
    fn.consts = sorted({float(a) for n in order for a in (*n.args, *n.kwargs.values())
                        if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)})[:8]
    fn.learned = sorted({float(v.reshape(())) for v in learned.values()   # the learned scalars (xielu's)
                         if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point()})
    return fn


def _probe(consts) -> torch.Tensor:
    """Probe values: a grid over [-6, 6] and points around every constant of the ops (clamps at 7 show)."""
    extra = [c * s for c in consts if c != 0.0 for s in (-2.0, -1.5, -1.01, -0.99, -0.5, 0.5, 0.99, 1.01, 1.5, 2.0)]
    return torch.cat([torch.linspace(-6.0, 6.0, 49), torch.tensor(extra, dtype=torch.float32)])


def _close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    return y.shape == ref.shape and bool(torch.allclose(y, ref, rtol=1e-5,
                                                        atol=1e-5 * max(1.0, float(ref.abs().max()))))


def _gate_specs(consts):
    """Candidate gate sides, simplest first: the registry, then swish(alpha) and the clamps on the constants."""
    yield from (ActivationSpec(n) for n in ACTIVATIONS)
    bases = [ActivationSpec(n) for n in ACTIVATIONS] + [ActivationSpec("swish", alpha=c) for c in consts if c > 0]
    for b in bases:
        for gmax in [None, *consts]:
            for amax in [None, *consts]:
                if gmax is not None or amax is not None or b.base == "swish":   # the plain ones came first
                    yield dataclasses.replace(b, gate_max=gmax, act_max=amax)


def _read_gate(a: torch.Tensor, v: torch.Tensor, consts) -> ActivationSpec | None:
    return next((spec for spec in _gate_specs(consts) if _close(a, Activation(spec)(v))), None)


def identify_activation(src: fx.Node, dst: fx.Node) -> str:
    """Name of the elementwise function computed from `src` to `dst`, found by evaluating it on a probe."""
    if gu.root_views(dst) is gu.root_views(src):
        return "identity"
    fn = elementwise_fn(src, dst)
    probe = _probe(fn.consts)   # CPU on purpose: the ops alone, no model tensor, values read back
    try:
        with torch.no_grad():
            y = fn(probe)
    except Exception as e:  # an op that does not run on a 1-D probe: not an elementwise activation
        raise _Miss(f"activation ops {fn.ops} are not elementwise ({type(e).__name__})")
    spec = _read_gate(y, probe, fn.consts) or _fit_xielu(y, probe, fn.learned)
    if spec is None:
        raise _Miss(f"activation computed by {fn.ops[:6]} matches none of {sorted(ACTIVATIONS)} (nor swish or "
                    f"clamps on its constants {fn.consts}, nor xielu)")
    return spec.name


def _fit_xielu(y: torch.Tensor, v: torch.Tensor, learned: list[float]) -> ActivationSpec | None:
    """xielu's four parameters fitted to y = f(v) by least squares (alpha_p, beta on v > 0; alpha_n on v <= 0, for
    eps among the learned scalars the function reads, or xIELU's default -1e-6), each snapped to a learned scalar
    within 1e-5; the spec when it reproduces y, else None."""
    y64, v64 = y.double(), v.double()
    pos, neg = v64 > 0, v64 < -1e-3
    if int(pos.sum()) < 2 or int(neg.sum()) < 1:
        return None
    snap = lambda c: next((s for s in learned if abs(s - c) <= 1e-5 * max(1.0, abs(c))), c)  # noqa: E731
    A = torch.stack([v64[pos] ** 2, v64[pos]], dim=1)
    ap, beta = (snap(float(c)) for c in torch.linalg.lstsq(A, y64[pos, None]).solution[:, 0])
    for eps in dict.fromkeys([c for c in learned if -1e-2 < c <= 0] + [-1e-6]):
        basis = torch.expm1(v64[neg].clamp(max=eps)) - v64[neg]
        an = snap(float((basis @ (y64[neg] - beta * v64[neg])) / (basis @ basis)))
        spec = ActivationSpec("xielu", alpha_p=ap, alpha_n=an, beta=beta, eps=eps)
        if all(math.isfinite(c) for c in (ap, an, beta)) and _close(Activation(spec)(v), y):
            return spec
    return None


def identify_glu(a: fx.Node, b: fx.Node, dst: fx.Node) -> tuple[str, bool]:
    """(activation name, whether `a` is the gate) of the gated unit `dst` computes from the two halves `a` and `b`:
    dst = gate_side(gate) * up_side(up) with the sides of `routefx.ir.activations.ActivationSpec`, found by
    evaluating the ops on a grid of (a, b) values. Raises `_Miss` when it is no such unit."""
    fn = elementwise_fn((a, b), dst)
    v = _probe(fn.consts)
    n = v.numel()
    try:
        with torch.no_grad():
            y = fn(v[:, None].expand(n, n).reshape(-1), v[None, :].expand(n, n).reshape(-1))
    except Exception as e:  # noqa: BLE001 - not elementwise on 1-D probes
        raise _Miss(f"gated unit ops {fn.ops[:6]} are not elementwise ({type(e).__name__})") from None
    y = y.reshape(n, n) if y.numel() == n * n else None
    if y is not None:
        for a_gate, Y in ((True, y), (False, y.t())):      # Y[i, j] = unit(gate = v[i], up = v[j])
            for lim in [None, *sorted({abs(c) for c in fn.consts if c != 0.0})]:
                for add in [0.0, *fn.consts]:
                    up = Activation(ActivationSpec("identity", up_limit=lim, up_add=add)).up(v)   # [n]
                    coef = Y @ up / (up @ up)                                                    # [n] gate side
                    if not _close(Y, coef[:, None] * up[None, :]):
                        continue
                    gate = _read_gate(coef, v, fn.consts)
                    if gate is not None:
                        return dataclasses.replace(gate, up_limit=lim, up_add=add).name, a_gate
    raise _Miss(f"the two halves are not combined as act(gate) * up (nor a clamped unit on the constants "
                f"{fn.consts}): ops {fn.ops[:8]}")


def _halves(m: fx.Node, F2: int) -> dict:
    """For a fused gate-up product: getitem/slice node -> (start, end) row range of the [2F, d] weight."""
    out = gu.forward_views(m)
    parts = {}
    for u in out.users:
        if u.op != "call_function":
            continue
        if u.target in gu._targets(aten.chunk, aten.split, aten.split_with_sizes):
            dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
            if dim not in (-1, gu.val(out).dim() - 1):
                raise _Miss(f"fused gate-up output split along dim {dim}, not the last")
            for g in u.users:
                if gu.is_getitem(g):
                    size = gu.val(g).shape[-1]
                    parts[g] = (g.args[1] * size, (g.args[1] + 1) * size) if u.target in gu._targets(
                        aten.chunk, aten.split) else None
        elif u.target in gu._targets(aten.slice) and u.args[1] in (-1, gu.val(out).dim() - 1):
            step = u.args[4] if len(u.args) > 4 else 1
            if step != 1:
                raise _Miss("interleaved gate/up layout (strided slices) is not supported")
            parts[u] = (u.args[2], min(u.args[3], F2))
    if len(parts) != 2 or None in parts.values():
        raise _Miss("fused gate-up product is not split into two contiguous halves")
    return parts


_SPLITS = gu._targets(aten.chunk, aten.split, aten.split_with_sizes, aten.slice)


def _is_split(m: fx.Node) -> bool:
    """Is the product's output cut into parts (a fused gate-up weight)?"""
    return any(u.op == "call_function" and u.target in _SPLITS for u in gu.forward_views(m).users)


def _dense(gm, mms: list, region: set, dyn: set, same_shape: bool = True) -> tuple[str, str, int, DenseFFNMatch]:
    mmset = set(mms)
    first = [m for m in mms if not (_anc_in(m, region) & mmset)]
    later = [m for m in mms if m not in first]
    if len(later) != 1 or len(first) not in (1, 2):
        raise _Miss(f"{len(mms)} matrix products in a {len(first)}-input layout (expected two or three: "
                    "up[, gate], down)")
    down = later[0]
    d_data, d_ref, d_bias = _operands(down, dyn)
    ins = [_operands(m, dyn) for m in first]
    inp = gu.root_views(ins[0][0])
    if any(gu.root_views(i[0]) is not inp for i in ins):
        raise _Miss("the input products read different values")
    e = gu.root_views(d_data)
    if len(first) == 2:
        if e.op != "call_function" or e.target not in gu._targets(aten.mul):
            raise _Miss("two input products not combined by a product (not a gated FFN)")
        outs = [gu.forward_views(m) for m in first]
        act, first_is_gate = identify_glu(outs[0], outs[1], e)
        up, gate = (ins[1], ins[0]) if first_is_gate else (ins[0], ins[1])
        kind, F = "gated", resolve_weight(gm, up[1]).shape[0]
        refs = dict(up=up[1], gate=gate[1], b_up=up[2], b_gate=gate[2])
    else:
        (f_data, f_ref, f_bias), = ins
        rows = resolve_weight(gm, f_ref).shape[0]
        if _is_split(first[0]) and e.op == "call_function" and e.target in gu._targets(aten.mul):
            parts = _halves(first[0], rows)
            a, b = parts
            act, a_gate = identify_glu(a, b, e)
            gnode, q = (a, b) if a_gate else (b, a)
            kind, F = "gated", rows // 2
            if f_bias is not None:
                raise _Miss("bias on a fused gate-up product is not supported")
            refs = dict(up=WeightRef(f_ref.target, f_ref.transposed, parts[q], f_ref.index),
                        gate=WeightRef(f_ref.target, f_ref.transposed, parts[gnode], f_ref.index), b_up=None,
                        b_gate=None)
        else:
            act = identify_activation(gu.forward_views(first[0]), e)
            kind, F = "mlp", rows
            refs = dict(up=f_ref, gate=None, b_up=f_bias, b_gate=None)
    out = gu.forward_views(down)
    # an explicit bias add after the down product (x @ W + b)
    if d_bias is None and len(out.users) == 1:
        u = next(iter(out.users))
        if u.op == "call_function" and u.target in gu.ADD:
            other = [a for a in u.args[:2] if a is not out]
            if other and isinstance(other[0], fx.Node) and other[0] not in dyn:
                d_bias = param_ref(other[0], dyn)
                out = gu.forward_views(u)
    if same_shape and str(gu.val(out).shape) != str(gu.val(inp).shape):
        # back along the casts and views taken after the output (an unsqueeze to broadcast it over parallel
        # streams), to the earliest value of the input's shape
        n, found = out, None
        while n is not down and (gu.is_identity(n) or n.target in gu.VIEWS):
            n = n.args[0]
            found = n if str(gu.val(n).shape) == str(gu.val(inp).shape) else found
        out = found or out
    if same_shape and str(gu.val(out).shape) != str(gu.val(inp).shape):
        raise _Miss(f"FFN output shape {tuple(gu.val(out).shape)} differs from its input "
                    f"{tuple(gu.val(inp).shape)}")
    nodes = frozenset((gu.between(inp, out) | {out}))
    match = DenseFFNMatch(inp=inp, out=out, nodes=nodes, down=d_ref, b_down=d_bias, **refs)
    return kind, act, F, match


def _expert_index(router: fx.Node, region: set, experts: set) -> fx.Node | None:
    """The [..., k] integer tensor of chosen experts: the last integer value in `region` that comes from the
    router's [..., E] scores, keeps their leading dims and reaches the experts. Read from shapes, so top-k,
    k successive arg-maxes concatenated (Phi-MoE's sparsemixer) and group-limited routing (DeepSeek-V3: top-k
    over groups first, then over the experts of the chosen groups) all give the final choice."""
    scores = gu.val(router)
    feeds = gu.ancestors(experts)
    found, every = None, None     # k < E; k = E (every expert chosen: taken only when no k < E choice exists)
    for n in router.graph.nodes:
        v = gu.val(n)
        if n not in region or n not in feeds or v is None or v.is_floating_point() or v.dtype == torch.bool:
            continue
        if v.dim() == scores.dim() and isinstance(v.shape[-1], int) and 0 < v.shape[-1] <= scores.shape[-1] \
                and [str(s) for s in v.shape[:-1]] == [str(s) for s in scores.shape[:-1]] \
                and router in gu.ancestors([n]):
            if v.shape[-1] < scores.shape[-1]:
                found = n
            else:
                every = n
    return found if found is not None else every


_MASKING = gu._targets(aten.masked_fill, aten.where)


_BIAS_ADDS = gu.targets(aten.add, aten.add_)


def _row_bias(u: fx.Node, n: fx.Node) -> fx.Node | None:
    """The stacked [E, width] parameter whose rows `u` adds to `n`, one gathered row per row of `n` by its expert id
    (`n + b[ids]`: GPT-OSS's expert biases after each grouped GEMM), else None."""
    if u.op != "call_function" or u.target not in _BIAS_ADDS or len(u.args) < 2 or u.args[0] is not n \
            and u.args[1] is not n or u.kwargs.get("alpha", 1) != 1:
        return None
    other = u.args[1] if u.args[0] is n else u.args[0]
    if not isinstance(other, fx.Node) or other.target not in gu.targets(aten.index) or len(other.args[1]) != 1:
        return None
    base = other.args[0]
    v = gu.val(base)
    return base if base.op == "get_attr" and v is not None and v.dim() == 2 else None


def expert_epilogue(n: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(`n` followed forward through views, shape-keeping masking (transformers 5.17 zeroes the rows of tokens routed
    to no expert right after each grouped GEMM) and a per-expert bias add; that bias's stacked parameter or None)."""
    n, bias = gu.forward_views(n), None
    while len(n.users) == 1:
        u = next(iter(n.users))
        b = _row_bias(u, n) if bias is None else None
        if b is None and (u.op != "call_function" or u.target not in _MASKING
                          or str(gu.val(u).shape) != str(gu.val(n).shape)):
            break
        bias = bias if b is None else b
        n = gu.forward_views(u)
    return n, bias


def stacked_weight(gm, n: fx.Node) -> tuple[torch.Tensor | None, str]:
    """(the [E, in, out] tensor a grouped or batched product reads as its weight operand: a 3-D parameter, possibly
    transposed in its last two dims, else None; the reason when None)."""
    flips = 0
    while n.op == "call_function":
        if gu.is_identity(n):
            n = n.args[0]
        elif n.target in gu.targets(aten.transpose) and sorted(a % 3 for a in n.args[1:3]) == [1, 2]:
            flips, n = flips + 1, n.args[0]
        else:
            return None, f"expert weight computed by {n.target}, not read from a stacked parameter"
    if n.op != "get_attr":
        return None, "expert weight is not a parameter"
    w = fetch(gm, n.target)
    if w.dim() != 3:
        return None, f"expert weight {n.target} has shape {list(w.shape)}, not [E, in, out]"
    return (w.transpose(1, 2) if flips % 2 else w), ""


def batched_experts(gm, nodes) -> list[fx.Node]:
    """The batched products (bmm, 3-D matmul) among `nodes` whose weight operand is a stacked [E, in, out]
    parameter, in graph order: experts evaluated for every token at once."""
    out = [m for m in nodes if m.op == "call_function" and m.target in gu.targets(aten.bmm, aten.matmul)
           and len(m.args) > 1 and isinstance(m.args[1], fx.Node) and getattr(gu.val(m), "dim", lambda: 0)() == 3
           and stacked_weight(gm, m.args[1])[0] is not None]
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)} if out else {}
    return sorted(out, key=order.get)


def first_after(outs: list, region: set, shape: list[str]) -> fx.Node | None:
    """The first node of `region` (graph order) that every one of `outs` reaches and that has `shape`: where
    expert outputs are summed."""
    common = set.intersection(*(gu.descendants(o) for o in outs)) & region
    want = [str(s) for s in shape]
    return next((n for n in outs[0].graph.nodes if n in common and isinstance(gu.val(n), torch.Tensor)
                 and [str(s) for s in gu.val(n).shape] == want), None)


def expert_ffns(gm, mms: list, region: set, dyn: set, router: fx.Node, experts: int
                ) -> tuple[list[DenseFFNMatch], DenseFFNMatch | None, str, int]:
    """Experts written as separate dense FFN modules (a loop over the experts gathering their tokens, or every
    expert on every token weighted afterwards): the weight products other than the router, grouped into FFNs by
    their data flow (each down product with the products it reads), in graph order of the down products; with
    `experts` + 1 FFNs, the one that joins only after the others' sum is a shared expert. Returns (the routed
    experts, the shared one or None, their activation, their width); raises `_Miss` when they do not group so, or
    differ in kind, activation, width or down bias."""
    rest = [m for m in mms if m is not router]
    split = _split_experts(gm, rest, dyn)
    if split is not None:
        found, act, F, others = split
        if len(found) != experts:
            raise _Miss(f"a router over {experts} experts, but the tokens are split into {len(found)} expert pieces")
        others = [m for m in others if gu.val(m).shape[-1] != 1]      # a shared expert's own 1-wide gate
        try:
            shared = _dense(gm, others, region, dyn, same_shape=False)[3] if others else None
        except _Miss:
            shared = None   # not one dense FFN: the experts are still read, the rest stays as captured, unnamed
        return found, shared, act, F
    pool = set(rest)
    downs = [m for m in rest if _anc_in(m, region) & pool]
    groups = [[m for m in rest if m not in downs and m in _anc_in(dn, region)] + [dn] for dn in downs]
    if not groups or any(len(g) not in (2, 3) for g in groups) or sum(map(len, groups)) != len(rest):
        raise _Miss(f"{len(rest)} expert products do not group into separate dense FFNs")
    found = [_dense(gm, g, region, dyn, same_shape=False) for g in groups]
    shared = None
    if len(found) == experts + 1:
        shape = [str(s) for s in gu.val(_operands(router, dyn, router=True)[0]).shape]   # [T, d] as the router reads it
        outs = [m.out for *_, m in found]
        for i, o in enumerate(outs):
            c = first_after(outs[:i] + outs[i + 1:], region, shape)
            if c is not None and o not in gu.ancestors([c]):
                shared = i
                break
        if shared is None:
            raise _Miss(f"{len(found)} expert FFNs for {experts} router outputs, and none joins after the others' "
                        "sum (a shared expert)")
    elif len(found) != experts:
        raise _Miss(f"a router over {experts} experts, but {len(found)} expert FFNs")
    routed = [f for i, f in enumerate(found) if i != shared]
    kinds = {(k, act, int(F), m.b_down is None) for k, act, F, m in routed}
    if len(kinds) != 1:
        raise _Miss(f"the {len(routed)} expert FFNs differ in kind, activation or width: {sorted(map(str, kinds))}")
    (_, act, F, _), = kinds
    return [m for *_, m in routed], (None if shared is None else found[shared][3]), act, F


_ROW_SPLITS = gu._targets(aten.split, aten.split_with_sizes)


def _piece(m: fx.Node, dyn: set) -> tuple[fx.Node, int] | None:
    """(the split, the piece's index) when product `m` reads one piece of a split along dim 0, else None."""
    try:
        data = gu.root_views(_operands(m, dyn)[0])
    except _Miss:
        return None
    if not gu.is_getitem(data) or data.args[0].op != "call_function" or data.args[0].target not in _ROW_SPLITS:
        return None
    s = data.args[0]
    dim = s.args[2] if len(s.args) > 2 else s.kwargs.get("dim", 0)
    return (s, data.args[1]) if dim == 0 else None


def _row_cat(outs: list) -> fx.Node:
    """The concatenation along dim 0 of exactly `outs` (each through its views), in that order."""
    ends = [gu.forward_views(o) for o in outs]
    for c in ends[0].users:
        if c.op == "call_function" and c.target in gu._targets(aten.cat) \
                and (c.args[1] if len(c.args) > 1 else c.kwargs.get("dim", 0)) == 0 and list(c.args[0]) == ends:
            return c
    raise _Miss("the expert products' outputs are not concatenated along the rows in expert order")


def _split_experts(gm, mms: list, dyn: set):
    """Experts over tokens sorted by expert and split by count (JetMoE, ScatterMoE-style code):

        pieces = split(x[sorted tokens], counts)           # expert e's rows: pieces[e]
        h = act(cat([up_e(pieces[e]) for e]))              # (or a gated unit of a fused gate-up, or of gate_e, up_e)
        y = cat([down_e(piece) for e, piece in enumerate(split(h, counts))])

    Row r of h comes from the expert whose piece holds row r, and the activation is row-wise, so y's rows are
    FFN_e(x[t]) of the expert e and token t they were sorted as: an expert FFN per piece. Returns (the experts'
    DenseFFNMatch, read from piece to down product, in expert order; the activation; the width; the products
    outside the pieces), None when fewer than two products read pieces of a row split; raises `_Miss` when they
    read pieces but not in this layout."""
    pieces = {m: _piece(m, dyn) for m in mms}
    on_pieces = [m for m in mms if pieces[m] is not None]
    if len(on_pieces) < 2:
        return None
    splits = list(dict.fromkeys(pieces[m][0] for m in on_pieces))      # graph order (mms are)
    if len(splits) != 2:
        raise _Miss(f"expert products read pieces of {len(splits)} row splits (expected two: the tokens, then the "
                    "experts' hidden rows)")
    s_in, s_hid = splits
    E = len(s_in.args[1]) if s_in.target in gu._targets(aten.split_with_sizes) else None
    if E is None or s_hid.target != s_in.target or len(s_hid.args[1]) != E \
            or [str(a) for a in s_hid.args[1]] != [str(a) for a in s_in.args[1]]:
        raise _Miss("the tokens and the experts' hidden rows are not split by the same per-expert counts")
    by = {s: [[m for m in on_pieces if pieces[m] == (s, e)] for e in range(E)] for s in splits}
    if any(len(ms) != 1 for ms in by[s_hid]) or len({len(ms) for ms in by[s_in]}) != 1 \
            or len(by[s_in][0]) not in (1, 2):
        raise _Miss("not one down product per expert piece and the same one or two input products per piece")
    downs = [ms[0] for ms in by[s_hid]]
    streams = [[ms[j] for ms in by[s_in]] for j in range(len(by[s_in][0]))]    # [stream][expert]
    cats = [_row_cat(st) for st in streams]
    _row_cat(downs)
    h = gu.root_views(s_hid.args[0])
    ins = [[_operands(m, dyn) for m in st] for st in streams]
    if len(cats) == 2:
        act, first_is_gate = identify_glu(cats[0], cats[1], h)
        up, gate = (ins[1], ins[0]) if first_is_gate else (ins[0], ins[1])
        refs = [dict(up=u[1], gate=g[1], b_up=u[2], b_gate=g[2]) for u, g in zip(up, gate)]
    elif _is_split(cats[0]) and h.op == "call_function" and h.target in gu._targets(aten.mul):
        rows = int(gu.val(cats[0]).shape[-1])
        parts = _halves(cats[0], rows)
        a, b = parts
        act, a_gate = identify_glu(a, b, h)
        g_rows, u_rows = (parts[a], parts[b]) if a_gate else (parts[b], parts[a])
        if any(i[2] is not None for i in ins[0]):
            raise _Miss("bias on a fused gate-up product is not supported")
        refs = [dict(up=dataclasses.replace(r, rows=u_rows), gate=dataclasses.replace(r, rows=g_rows), b_up=None,
                     b_gate=None) for _, r, _ in ins[0]]
    else:
        act = identify_activation(cats[0], h)
        refs = [dict(up=r, gate=None, b_up=b, b_gate=None) for _, r, b in ins[0]]
    found = []
    for e, dn in enumerate(downs):
        _, d_ref, d_bias = _operands(dn, dyn)
        inp = gu.root_views(_operands(streams[0][e], dyn)[0])
        found.append(DenseFFNMatch(inp=inp, out=gu.forward_views(dn), nodes=frozenset({dn, *(s[e] for s in streams)}),
                                   down=d_ref, b_down=d_bias, **refs[e]))
    widths = {int(resolve_weight(gm, m.up).shape[0]) for m in found}
    if len(widths) != 1:
        raise _Miss(f"the experts' widths differ: {sorted(widths)}")
    if len({m.b_down is None for m in found}) != 1:
        raise _Miss("some experts' down products have a bias and others not")
    return found, act, widths.pop(), [m for m in mms if pieces[m] is None]


def _per_expert_moe(gm, mms: list, region: set, dyn: set, info: FFNInfo, term: fx.Node) -> None:
    routers = [m for m in mms if isinstance(gu.val(m).shape[-1], int) and gu.val(m).shape[-1] > 1
               and _expert_index(m, region, {term}) is not None]
    if len(routers) != 1:
        raise _Miss(f"a top-k router, but the experts are {len(mms)} plain matrix products rather than the "
                    "grouped-GEMM pair transformers exports, batched products over stacked expert weights or "
                    f"one dense FFN per router output ({len(routers)} router candidates)")
    router = routers[0]
    _, r_ref, _ = _operands(router, dyn, router=True)
    E = resolve_weight(gm, r_ref).shape[0]
    experts, shared, act, F = expert_ffns(gm, mms, region, dyn, router, E)
    info.num_experts, info.top_k = E, int(gu.val(_expert_index(router, region, {term})).shape[-1])
    info.intermediate_size, info.activation = int(F), act
    if shared is not None:
        info.shared_expert_size = int(resolve_weight(gm, shared.up).shape[0])
    info.has_bias = any(r is not None for m in experts for r in (m.b_up, m.b_gate, m.b_down)) \
        or _operands(router, dyn, router=True)[2] is not None


def table_routes(mms: list, experts: list, E: int) -> tuple[list, fx.Node | None]:
    """Experts chosen by something other than the router (hash routing: a fixed token-id -> experts table, as in
    DeepSeek-V4's first layers and Hash Layers), the router's [..., E] scores only weighting the chosen experts:
    ([the router product], the [..., K] expert ids) where exactly one product of width E reads no value the experts
    read and an integer [..., K] value (K < E) with the router's leading dims feeds the experts; ([], None)
    otherwise. The ids are the last such value (in graph order) before the experts, inside the branch's region or
    not (a table lookup of the input ids depends on no value of the residual stream)."""
    feeds = gu.ancestors(experts)
    routers = [m for m in mms if m not in experts and m not in feeds and gu.val(m) is not None
               and isinstance(gu.val(m).shape[-1], int) and gu.val(m).shape[-1] == E]
    if len(routers) != 1:
        return [], None
    lead = [str(s) for s in gu.val(routers[0]).shape[:-1]]
    ids = [n for n in routers[0].graph.nodes if n in feeds and isinstance(gu.val(n), torch.Tensor)
           and not gu.val(n).is_floating_point() and gu.val(n).dtype != torch.bool
           and [str(s) for s in gu.val(n).shape[:-1]] == lead and isinstance(gu.val(n).shape[-1], int)
           and 0 < gu.val(n).shape[-1] < E]
    return (routers, ids[-1]) if ids else ([], None)


def _moe(gm, mms: list, region: set, dyn: set, info: FFNInfo, term: fx.Node) -> None:
    grouped = [m for m in mms if gu.is_grouped_mm(m)] or batched_experts(gm, mms)
    if not grouped:
        return _per_expert_moe(gm, mms, region, dyn, info, term)
    feeds = gu.ancestors(grouped)
    router = [m for m in mms if m not in grouped and m in feeds and isinstance(gu.val(m).shape[-1], int)
              and _expert_index(m, region, set(grouped)) is not None]
    stacked, _ = stacked_weight(gm, grouped[0].args[1])
    routes = _expert_index(router[0], region, set(grouped)) if len(router) == 1 else None
    if not router and stacked is not None:
        router, routes = table_routes(mms, grouped, int(stacked.shape[0]))
    if len(router) != 1:
        raise _Miss(f"expected one router product choosing the experts, found {len(router)}")
    _, r_ref, _ = _operands(router[0], dyn, router=True)
    info.num_experts = resolve_weight(gm, r_ref).shape[0]
    if stacked is not None and stacked.shape[0] < info.num_experts:  # the router also scores a shared expert
        info.num_experts = int(stacked.shape[0])                      # (Inkling): the experts are the stacked ones
    info.top_k = int(gu.val(routes).shape[-1])
    if len(grouped) != 2:
        raise _Miss(f"router with top-{info.top_k} found, but its experts are not a pair of grouped or batched "
                    f"products (found {len(grouped)})")
    up, down = grouped
    F = gu.val(gu.root_views(down.args[0])).shape[-1]
    info.intermediate_size = int(F)
    e = gu.root_views(down.args[0])
    out, up_bias = expert_epilogue(up)
    _, down_bias = expert_epilogue(down)
    parts = [g for u in out.users if u.op == "call_function" and u.target in _SPLITS
             for g in ([u] if u.target in gu._targets(aten.slice) else u.users) if g is u or gu.is_getitem(g)]
    if parts:
        if len(parts) != 2:
            raise _Miss(f"the experts' gate-up output is cut into {len(parts)} parts, not a gate and an up half")
        info.activation, _ = identify_glu(*parts, e)
    else:
        info.activation = identify_activation(out, e)
    # a shared expert: the remaining weight products that read the experts' input, minus 1-wide gates
    rest = _beside_experts(mms, set(grouped) | set(router), router[0], dyn)
    if rest:
        try:
            info.shared_expert_size = int(_dense(gm, rest, region, dyn, same_shape=False)[2])
        except _Miss:
            pass  # not one dense FFN (Inkling's shared experts are batched products over stacked weights, gated
            # inside): the routed experts are still read; the shared part stays as captured and unnamed
    info.has_bias = any(_bias_of(m, dyn) is not None for m in mms if m not in grouped) \
        or up_bias is not None or down_bias is not None


def _data_of(m: fx.Node, dyn: set):
    """What a matrix product reads: a weight product's data operand, another product's (a batched one) first
    argument."""
    try:
        return _operands(m, dyn)[0]
    except _Miss:
        return m.args[0]


def _bias_of(m: fx.Node, dyn: set):
    """The bias of a weight product, None for one without or for another product (a batched one)."""
    try:
        return _operands(m, dyn)[2]
    except _Miss:
        return None


def _beside_experts(mms: list, experts: set, reader: fx.Node, dyn: set, data: fx.Node | None = None) -> list:
    """The weight products of an MoE branch that may form its shared expert: not `experts`, wider than 1 (a
    shared expert's own sigmoid gate is 1 wide), and not computing the experts' input. The input is what `reader`
    (the router, or the raised op's `data`) reads, up to views and same-dtype casts; a product upstream of it, or
    reading a value upstream of it, belongs to what prepares that input (AXK2's norm with its own small MLP,
    Qwen4-Exp's low-rank hyper-connection mixing and its write-back weights), not to an expert."""
    x = gu.root_views(data if data is not None else _data_of(reader, dyn))
    before = gu.ancestors([x]) if isinstance(x, fx.Node) else set()
    return [m for m in mms if m not in experts and m is not reader and gu.val(m).shape[-1] != 1
            and m not in before and gu.root_views(_data_of(m, dyn)) not in before]


def _expert_ranges(ranges: list, gates, routes, rows_per_expert: bool = False) -> tuple[int, int] | None:
    """(experts, width) when a routed_ffn reads as top-k experts: gate weights, K >= 2 routes per token (or
    `rows_per_expert`: RaiseMoE's op for batched experts, one row per chosen expert), and >= 2 equal, adjacent,
    non-empty ranges from 0 (optionally followed by one empty range: AdaptExperts' skip). None otherwise (Duo's
    skip/small/big, a dense range)."""
    spans = [(int(ranges[i]), int(ranges[i + 1])) for i in range(0, len(ranges), 2)]
    if spans and spans[-1][0] == spans[-1][1]:
        spans = spans[:-1]
    k = gu.val(routes).shape[-1] if isinstance(gu.val(routes), torch.Tensor) else None
    if not rows_per_expert and (gates is None or not isinstance(k, int) or k < 2) or len(spans) < 2:
        return None
    width = spans[0][1] - spans[0][0]
    if width <= 0 or any(sp != (e * width, (e + 1) * width) for e, sp in enumerate(spans)):
        return None
    return len(spans), width


def _routed(gm, op: fx.Node, mms: list, region: set, dyn: set, info: FFNInfo) -> None:
    """Read an FFN that a pass already raised to `routefx::routed_ffn`; a raised MoE block (see `_expert_ranges`)
    reads as kind "moe" with its experts, top-k, expert width and shared expert, as before the rewrite."""
    (x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, act) = op.args
    info.kind = "mlp" if w_gate is None else "gated"
    info.activation = act
    info.intermediate_size = int(gu.val(w_up).shape[0])
    info.has_bias = any(b is not None for b in (b_up, b_gate, b_down))
    info.routed = [[int(ranges[i]), int(ranges[i + 1])] for i in range(0, len(ranges), 2)]
    ref = lambda n: None if n is None else param_ref(n, dyn)  # noqa: E731
    info.match = DenseFFNMatch(inp=x, out=op, nodes=frozenset({op}), up=ref(w_up), gate=ref(w_gate),
                               down=ref(w_down), b_up=ref(b_up), b_gate=ref(b_gate), b_down=ref(b_down))
    info.path = op.meta.get("routefx_path") or gu.common_path([op])
    experts = _expert_ranges(list(ranges), gates, routes)
    if experts is None and MOE_TOP_K in op.meta:
        experts = _expert_ranges(list(ranges), gates, routes, rows_per_expert=True)
    if experts is None:
        return
    info.kind, info.top_k = "moe", op.meta.get(MOE_TOP_K) or int(gu.val(routes).shape[-1])
    info.num_experts, info.intermediate_size = experts
    # a shared expert: the branch's other weight products, minus the router's and 1-wide gates (the router feeds the
    # routes, or only the gates where something else chooses the experts: hash routing)
    feeds_routes = gu.ancestors([routes]) | (gu.ancestors([gates]) if isinstance(gates, fx.Node) else set())
    # the experts' input is what the router reads (the op's x may be weighted by the gates: batched experts)
    routers = [m for m in mms if m in feeds_routes]
    reader, data = (routers[0], None) if len(routers) == 1 else (op, x)
    rest = [m for m in _beside_experts(mms, {op}, reader, dyn, data=data) if m not in feeds_routes]
    if rest:
        try:
            info.shared_expert_size = int(_dense(gm, rest, region, dyn, same_shape=False)[2])
        except _Miss:
            pass  # not a dense FFN: the experts are still read; the shared part stays unnamed


def _reads_all_streams(m: fx.Node, stream: fx.Node, d: int, region: set) -> bool:
    """Does product `m` read the residual stream flattened across its N parallel streams ([..., N*d] from a
    [..., N, d] stream, possibly normalised, with no product of the branch before it: the mixing weights of
    hyper-connections, DeepSeek-V4 / Hunyuan-V4)? Such a product weights how the branch reads and writes the
    streams; it is not part of the FFN."""
    sv = gu.val(stream)
    if sv is None or sv.dim() < 3 or not isinstance(sv.shape[-2], int) or sv.shape[-2] < 2:
        return False
    data = m.args[1] if m.target in gu.targets(aten.addmm) else m.args[0]
    dv = gu.val(data) if isinstance(data, fx.Node) else None
    if dv is None or dv.shape[-1] != sv.shape[-2] * d:
        return False
    before = gu.ancestors([data]) | {data}
    return stream in before and not any(gu.is_matmul(n) for n in before & region)


def analyse_ffn(gm, stream: fx.Node, term: fx.Node, region: set, kind: str, dyn: set) -> FFNInfo:
    d = int(gu.val(stream).shape[-1])
    mms = [n for n in stream.graph.nodes if n in region and gu.is_matmul(n)
           and not _reads_all_streams(n, stream, d, region)]
    info = FFNInfo(kind=kind, hidden_size=d, intermediate_size=None, activation=None, has_bias=False,
                   path=None)
    routed = [m for m in mms if gu.is_routed(m)]
    if routed:
        if len(routed) > 1:
            info.kind, info.reason = "unknown", f"{len(routed)} routed_ffn ops in one branch"
            return info
        _routed(gm, routed[0], mms, region, dyn, info)
        return info
    try:
        if kind == "moe":
            info.path = gu.common_path(mms)
            _moe(gm, mms, region, dyn, info, term)
            return info
        k, act, F, match = _dense(gm, mms, region, dyn)
        info.kind, info.activation, info.intermediate_size, info.match = k, act, int(F), match
        info.has_bias = any(r is not None for r in (match.b_up, match.b_gate, match.b_down))
        # the products and the activation name the FFN's module, not the casts at its ends (Gemma 4's norms
        # around its MLP cast the MLP's input and output, and name those casts)
        info.path = gu.common_path([n for n in match.nodes if n.op == "call_function" and not gu.is_identity(n)])
    except _Miss as miss:
        info.kind, info.reason = "unknown", str(miss)
        info.path = info.path or gu.common_path(mms)
    return info
