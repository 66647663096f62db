"""What each attention attends to, read from the graph: causal or not, a sliding window, an additive position bias
(ALiBi), logit soft-capping.

Two forms are read. An SDPA op: its `is_causal` flag, or its mask. Eager attention (no SDPA op): the scores
`Q·Kᵀ` go through element-wise ops to a softmax (scale, soft-cap `c·tanh(x/c)`, `+ mask`, `+ bias`,
`masked_fill`); recognised by structure as the product of two activations nearest behind a softmax.

What is allowed is read by *evaluating* the graph on a probe of P positions (batch 1, no padding): the nodes that
build an SDPA mask, or, for eager attention, the path from the scores to the softmax with the scores replaced by
zeros, which leaves exactly the masks and biases added to them (a soft-cap maps 0 to 0). The allowed pattern is
matched: all positions (bidirectional), the lower triangle (causal) or a band of width w (sliding window w); a
window of P or more reads as plain causal, which counts the same up to length P. The finite values left are an
additive bias: ALiBi when, per head, it equals slope·(j − i) up to a per-row constant (softmax ignores those).
What cannot be read says why (`reason`), and is never guessed.

The probe runs on CPU whatever the model's device (its values are read back; a `meta` model has none): tensors it
reads from the model (rarely any: position tables) are copied to CPU, and a probe that needs values the device
cannot give (a `meta` buffer) reads as "custom" with that reason. The scores are zeros, so no weight is read.
"""
from __future__ import annotations

import dataclasses
import math

import sympy
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from routefx.ir import graph_utils as gu

__all__ = ["MaskInfo", "attention_masks", "attention_site", "PROBE_POSITIONS", "SOFTMAX"]

PROBE_POSITIONS = 64
aten = torch.ops.aten
SOFTMAX = gu.targets(aten._softmax, aten.softmax, aten._safe_softmax)
# ops allowed between the scores Q·Kᵀ and the softmax, for the zero-scores probe to read the masks and biases
_ADDITIVE = gu.targets(aten.add, aten.sub)
_SCALAR_ONLY = gu.targets(aten.mul, aten.div)          # by a number: a scale (a tensor factor would be a mask)
_SELECT = gu.targets(aten.where, aten.masked_fill)      # a boolean mask
_SHAPE = gu.VIEWS | gu.CASTS | gu.IDENTITY | gu.TRANSPOSES | gu.targets(aten.expand, aten.slice, aten.contiguous)
_TANH = gu.targets(aten.tanh)


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    causal: bool
    window: int | None = None               # keys per query at most (sliding window), None = unlimited
    pattern: str = "causal"                 # "causal" | "bidirectional" | "sliding" | "custom"
    bias: str | None = None                 # "alibi" | "additive" (another finite bias) | None
    slopes: tuple[float, ...] | None = None  # ALiBi: bias = slope·(j − i) per head (one for all when shared)
    softcap: float | None = None            # scores soft-capped as c·tanh(x / c)
    reason: str | None = None               # what could not be read, and why


def _custom(reason: str, **kw) -> MaskInfo:
    return MaskInfo(False, None, "custom", reason=reason, **kw)


# ---- the probe -------------------------------------------------------------------------------------------------

def _expr(dim) -> sympy.Expr:
    """A dim as a sympy expression, with the shape environment's equalities applied (releases differ on that)."""
    if isinstance(dim, int):
        return sympy.Integer(dim)
    expr = sympy.sympify(dim.node.expr)
    env = getattr(dim.node, "shape_env", None)
    return sympy.sympify(env.replace(expr)) if env is not None and hasattr(env, "replace") else expr


def _probe_sizes(gm: fx.GraphModule, positions: int) -> dict:
    """Shape symbol -> probe size: an input's dim 0 (batch) is 1, its dim 1 (sequence) `positions`; read by
    position, never by symbol name (names differ between torch releases)."""
    sizes: dict = {}
    for n in gm.graph.nodes:
        v = gu.val(n) if n.op == "placeholder" else None
        for dim, size in zip(v.shape[:2] if v is not None else (), (1, positions)):
            if not isinstance(dim, int) and isinstance(e := _expr(dim), sympy.Symbol):
                sizes.setdefault(e, size)
    return sizes


def _concrete(shape, sizes: dict) -> list[int] | None:
    out = []
    for d in shape:
        e = _expr(d).subs(sizes)
        if e.free_symbols:
            return None
        out.append(int(e))
    return out


def _probe_inputs(gm: fx.GraphModule, sizes: dict):
    """Placeholder values on the probe (CPU on purpose: read back): ones for integer inputs, zeros otherwise."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            out.append(v)
            continue
        shape = _concrete(v.shape, sizes)
        if shape is None:
            raise ValueError(f"input {n.name} has a dim that is neither batch nor sequence")
        out.append(torch.zeros(shape, dtype=v.dtype) if v.is_floating_point() else torch.ones(shape, dtype=v.dtype))
    return out


def _static_length(gm: fx.GraphModule) -> int | None:
    """The sequence length of the first input with a sequence dim, where the graph fixes it (else None)."""
    for n in gm.graph.nodes:
        v = gu.val(n) if n.op == "placeholder" else None
        if v is not None and v.dim() >= 2:
            return int(v.shape[1]) if isinstance(v.shape[1], int) else None
    return None


def _on_cpu(a):
    return torch.device("cpu") if isinstance(a, torch.device) else a


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], positions: int, zeros: tuple = ()) -> tuple[dict, str]:
    """Values of `nodes` on the probe, computing only what they need, each node of `zeros` replaced by zeros of
    its shape; and, when some could not be computed, why."""
    sizes = _probe_sizes(gm, positions)
    g = fx.Graph()
    env: dict = {}
    need = gu.ancestors(nodes, stop=set(zeros)) | set(nodes)
    for n in gm.graph.nodes:
        if n in zeros:
            shape = _concrete(gu.val(n).shape, sizes)
            if shape is None:
                return {}, f"the shape of {n.name} {list(gu.val(n).shape)} is not one of batch and sequence"
            env[n] = g.call_function(torch.zeros, (shape,), {"dtype": gu.val(n).dtype})   # CPU on purpose
        elif n.op == "placeholder" or (n in need and n.op in ("call_function", "get_attr")):
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in nodes))
    sub = fx.GraphModule(gm, g)
    for n in sub.graph.nodes:  # the probe runs on CPU: copies of what it reads from the model
        # factories and moves the export recorded with the model's device
        n.args, n.kwargs = pytree.tree_map(_on_cpu, (n.args, n.kwargs))
        if n.op == "get_attr":
            owner, _, name = n.target.rpartition(".")
            mod = sub.get_submodule(owner) if owner else sub
            t = getattr(mod, name)
            if isinstance(t, torch.Tensor):
                if t.device.type == "meta":
                    return {}, f"the mask construction reads {n.target}, a tensor without values (meta device)"
                cpu = t.detach().to("cpu")   # a parameter stays one: a module takes no plain tensor in its place
                setattr(mod, name, nn.Parameter(cpu, requires_grad=False) if isinstance(t, nn.Parameter) else cpu)
    sub.recompile()
    try:
        with torch.no_grad():
            outs = sub(*_probe_inputs(gm, sizes))
    except Exception as e:  # a mask we cannot evaluate on the probe: reported as "custom", counted as full
        return {}, f"the mask construction does not run on a {positions}-position probe ({type(e).__name__})"
    return {n: o for n, o in zip(nodes, outs) if isinstance(o, torch.Tensor) and o.device.type == "cpu"}, ""


# ---- reading the probe's values ----------------------------------------------------------------------------------

def _classify(allowed: torch.Tensor) -> MaskInfo:
    """allowed: [P, P] bool (query i may attend key j)."""
    P = allowed.shape[-1]
    ones = torch.ones(P, P, dtype=torch.bool)   # CPU, like the probe's values
    if torch.equal(allowed, ones):
        return MaskInfo(False, None, "bidirectional")
    tril = torch.tril(ones)
    if torch.equal(allowed, tril):
        return MaskInfo(True, None, "causal")
    w = int(allowed[-1].sum())
    if 0 < w < P and torch.equal(allowed, tril & ~torch.tril(ones, diagonal=-w)):
        return MaskInfo(True, w, "sliding")
    return _custom("the allowed positions are neither all, the lower triangle nor a band")


def _alibi_slopes(bias: torch.Tensor, allowed: torch.Tensor) -> tuple[float, ...] | None:
    """Per-head slopes s with bias[h, i, j] = s_h·(j − i) + c_h(i) on the allowed positions, or None.
    bias, allowed: [H, P, P]; the diagonal is allowed (every pattern `_classify` accepts has it)."""
    P = bias.shape[-1]
    idx = torch.arange(P, dtype=torch.float64)                               # CPU: probe values
    rel = (idx[None, :] - idx[:, None]).expand_as(bias)                      # [H, P, P]: j - i
    d = bias - torch.diagonal(bias, dim1=-2, dim2=-1)[..., :, None]          # per-row constant removed
    off = allowed & (rel != 0)
    if not off.any():
        return None
    slopes = (torch.where(off, d * rel, 0).sum((-2, -1)) / torch.where(off, rel * rel, 0).sum((-2, -1)))   # [H]
    fit = slopes[:, None, None] * rel
    tol = 1e-5 * max(1.0, float(d[allowed].abs().max()))
    if float(torch.where(allowed, (d - fit).abs(), 0).max()) > tol:
        return None
    return tuple(float(s) for s in slopes)


def _read(v: torch.Tensor, positions: int) -> MaskInfo:
    """The pattern and bias of the values added to the scores (or a boolean mask), [..., P, P]."""
    if v.dim() < 2 or tuple(v.shape[-2:]) != (positions, positions):
        return _custom(f"the mask has shape {list(v.shape)}, not [..., {positions}, {positions}] on the probe")
    if not (v.dtype == torch.bool or v.is_floating_point()):
        return _custom(f"the mask has dtype {v.dtype} (neither bool nor floating point)")
    if v.dtype == torch.bool:
        allowed, bias = v.reshape(-1, positions, positions), None
    else:
        low = torch.finfo(v.dtype).min / 2                                  # -inf and dtype-min mark masked keys
        v = v.double().reshape(-1, positions, positions)
        allowed = v > low
        bias = torch.where(allowed, v, 0)
    if not all(torch.equal(a, allowed[0]) for a in allowed[1:]):
        return _custom("the allowed positions differ between heads or batch rows")
    info = _classify(allowed[0])
    if bias is None or info.pattern == "custom" or not bias.any():
        return info
    slopes = _alibi_slopes(bias, allowed)
    if slopes is None:
        return dataclasses.replace(info, bias="additive", reason="an additive score bias that is not linear in "
                                   "the query-key distance (not ALiBi)")
    if all(abs(x) <= 1e-12 for x in slopes):
        return info                             # a constant per query row: the softmax does not see it
    if len(set(slopes)) == 1:
        slopes = slopes[:1]
    return dataclasses.replace(info, bias="alibi", slopes=slopes)


# ---- eager attention: scores -> softmax ----------------------------------------------------------------------

def _scores(softmax: fx.Node, dyn: set) -> fx.Node | None:
    """The product of two activations (Q·Kᵀ) nearest behind `softmax`, breadth first, or None."""
    seen, frontier = set(), [softmax.args[0]]
    while frontier:
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            if gu.is_matmul(n):
                return n if gu.multiplies_activations(n, dyn) else None
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _softcap(t: fx.Node) -> float | None:
    """c when `t` (a tanh) reads x / c (or x · 1/c) and its one user multiplies it by c."""
    pre = t.args[0]
    if not isinstance(pre, fx.Node) or pre.target not in _SCALAR_ONLY or not isinstance(pre.args[1], (int, float)):
        return None
    c = float(pre.args[1]) if pre.target in gu.targets(aten.div) else 1.0 / float(pre.args[1])
    users = list(t.users)
    if len(users) != 1 or users[0].target not in gu.targets(aten.mul):
        return None
    post = [a for a in users[0].args if isinstance(a, (int, float))]
    return c if post and math.isclose(float(post[0]), c, rel_tol=1e-6) else None


def _eager_path(softmax: fx.Node, dyn: set) -> tuple[fx.Node, float | None] | MaskInfo:
    """(the scores Q·Kᵀ, the soft-cap) of an eager attention's softmax, or why its scores cannot be read."""
    qk = _scores(softmax, dyn)
    if qk is None:
        return _custom("the softmax does not read a product of two activations (Q·Kᵀ) through element-wise ops")
    path = (gu.descendants(qk) & gu.ancestors([softmax])) | {qk}          # scores -> softmax input
    softcap = None
    for n in path - {qk}:
        t = n.target
        side = [a for a in n.all_input_nodes if a not in path]
        if t in _TANH:
            softcap = _softcap(n)
            if softcap is None:
                return _custom(f"the scores go through tanh ({n.name}) not in the soft-cap form c·tanh(x/c)")
        elif t in _SCALAR_ONLY and side:
            return _custom(f"the scores are multiplied by a tensor ({n.name} reads {side[0].name}): a "
                           "multiplicative mask is not read")
        elif not (t in _ADDITIVE or t in _SCALAR_ONLY or t in _SELECT or t in _SHAPE):
            return _custom(f"the scores go through {t} ({n.name}) on their way to the softmax")
    return qk, softcap


def _eager(gm: fx.GraphModule, softmaxes: list[fx.Node], positions: int) -> dict[fx.Node, MaskInfo]:
    """MaskInfo per eager softmax that depends on the inputs: all of them evaluated in one probe with the scores
    as zeros (one probe per softmax where the joint one fails)."""
    dyn = gu.dynamic_nodes(gm.graph)
    out, paths = {}, {}
    for sm in softmaxes:
        if sm not in dyn:
            continue                                                    # a softmax of constants: no attention
        p = _eager_path(sm, dyn)
        if isinstance(p, MaskInfo):
            out[sm] = p
        else:
            paths[sm] = p
    inputs = [sm.args[0] for sm in paths]
    values, why = _evaluate(gm, inputs, positions, zeros=tuple(qk for qk, _ in paths.values()))
    for sm, (qk, softcap) in paths.items():
        if sm.args[0] not in values:
            values, why = _evaluate(gm, [sm.args[0]], positions, zeros=(qk,))
        v = values.get(sm.args[0])
        out[sm] = dataclasses.replace(_custom(why or "the probe gave no value") if v is None else _read(v, positions),
                                      softcap=softcap)
    return out


# ---- all attention sites -----------------------------------------------------------------------------------------

def _sdpa_mask_and_flag(n: fx.Node):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = dict(zip(names, n.args)) | dict(n.kwargs)
    return args.get("attn_mask"), bool(args.get("is_causal", False))


def attention_masks(gm: fx.GraphModule, positions: int = PROBE_POSITIONS) -> dict[fx.Node, MaskInfo]:
    """MaskInfo for every attention of `gm`: each SDPA op, and each softmax of eager attention (keyed by the
    softmax node)."""
    positions = _static_length(gm) or positions  # a graph specialised to one length runs only that one
    result: dict[fx.Node, MaskInfo] = {}
    masked = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in gu.ATTENTION:
            continue
        mask, causal = _sdpa_mask_and_flag(n)
        if causal:
            result[n] = MaskInfo(True, None, "causal")
        elif mask is None:
            result[n] = MaskInfo(False, None, "bidirectional")
        else:
            masked[n] = mask
    if masked:
        values, why = _evaluate(gm, list(dict.fromkeys(masked.values())), positions)
        for n, m in masked.items():
            v = values.get(m)
            result[n] = _custom(why or "the probe gave no value") if v is None else _read(v, positions)
    softmaxes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX]
    if softmaxes:
        result.update(_eager(gm, softmaxes, positions))
    return result


def attention_site(region: set, masks: dict[fx.Node, MaskInfo]) -> tuple[str, MaskInfo, fx.Node | None]:
    """(op name, what it attends to, the SDPA node) of the attention in a branch `region`: its SDPA op, else its
    eager softmax ("eager"); a branch with neither, or several softmaxes read differently, says so."""
    for n in region:
        if n.op == "call_function" and n.target in gu.ATTENTION:
            return getattr(n.target, "_opname", str(n.target)), masks[n], n
    infos = {masks[n] for n in region if n in masks and n.target in SOFTMAX}
    if len(infos) == 1:
        return "eager", infos.pop(), None
    if not infos:
        return "eager", _custom("no softmax over the scores in this attention branch: products of activations "
                                "without one (linear attention, a state-space scan such as Mamba-2's)"), None
    return "eager", _custom(f"{len(infos)} softmaxes in this branch read differently"), None
