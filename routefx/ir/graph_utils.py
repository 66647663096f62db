"""Small helpers over ATen fx graphs: op classes, looking through no-op nodes, reachability, module paths,
reading a graph's attributes. Views only: rewrites (dead-code cleanup included) are passes (`routefx/passes/`).

Op classes are data (one line each) so that recognition reads as rules, not as chains of `if`.
"""
from __future__ import annotations

import functools
import operator
from typing import Iterable

import torch
from torch import fx

import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.*)

aten = torch.ops.aten
ROUTED_FFN = torch.ops.routefx.routed_ffn.default


def targets(*ops) -> frozenset:
    """The set of op targets to match: each OpOverload given, and every overload of each OpOverloadPacket."""
    out = set()
    for op in ops:
        out.add(op)
        if hasattr(op, "overloads"):  # an OpOverloadPacket: accept every overload
            out.update(getattr(op, o) for o in op.overloads())
    return frozenset(out)


_targets = targets  # the name modules outside this file used before it was public


def fetch_attr(gm: torch.nn.Module, target: str):
    """The attribute a `get_attr` node's dotted `target` names on `gm` (as `fx.Interpreter.fetch_attr`)."""
    return functools.reduce(getattr, target.split("."), gm)


# Ops that pass their first argument through unchanged (in eval mode, same dtype): looked through everywhere.
IDENTITY = targets(aten.alias, aten.clone, aten.contiguous, aten.detach, aten.lift_fresh_copy,
                    aten.dropout, aten.feature_dropout, aten.alpha_dropout)
# aten.to / _to_copy are identities only when they keep the dtype (checked in `is_identity`).
CASTS = targets(aten.to, aten._to_copy, aten.type_as)
_DTYPE_CASTS = {aten.to.dtype, aten._to_copy.default}   # `is_cast`: a change of dtype alone
# Ops that only reshape: looked through when matching FFN boundaries (the FFN is applied per token).
VIEWS = targets(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.unsqueeze,
                 aten.squeeze)
# Matrix products. `grouped_mm` variants are matched by name since transformers registers its own.
MATMUL = targets(aten.linear, aten.mm, aten.addmm, aten.matmul, aten.bmm, aten.baddbmm, aten.einsum)
ATTENTION = targets(aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
                     aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention,
                     aten._scaled_dot_product_cudnn_attention)
NORMS = targets(aten.layer_norm, aten.native_layer_norm, aten.rms_norm, aten.group_norm)
REDUCTIONS = targets(aten.mean, aten.var, aten.var_mean, aten.sum, aten.std)
RSQRT = targets(aten.rsqrt, aten.sqrt, aten.reciprocal)
TRANSPOSES = targets(aten.t, aten.transpose, aten.permute, aten.numpy_T)
ADD = targets(aten.add)
TOPK = targets(aten.topk)


def is_grouped_mm(n: fx.Node) -> bool:
    return n.op == "call_function" and "grouped_mm" in str(n.target)


def product_operands(n: fx.Node) -> list:
    """The tensor operands of a matrix product, in order: `einsum(equation, [a, b, ...])` takes them as a list,
    `addmm` / `baddbmm` after the added term, the others as their first two arguments."""
    if n.target in EINSUM:
        ops = n.args[1] if len(n.args) > 1 else n.kwargs.get("tensors", ())
        return list(ops) if isinstance(ops, (list, tuple)) else []
    if n.target in targets(aten.addmm, aten.baddbmm):
        return list(n.args[1:3])
    return list(n.args[:2])


def multiplies_activations(n: fx.Node, values: set) -> bool:
    """Is `n` a product of two (or more) of `values` (eager attention's Q·Kᵀ and P·V, a state-space scan's
    products), not a weight product (linear, addmm, grouped expert GEMMs)?"""
    return n.op == "call_function" and n.target in MATMUL and n.target not in _WEIGHT_PRODUCTS \
        and sum(1 for a in product_operands(n) if isinstance(a, fx.Node) and a in values) >= 2


def einsum_equation(n: fx.Node) -> tuple[list[str], str]:
    """(the operands' index strings, the output's) of an einsum node, spaces removed; an implicit output is the
    indices named once, in alphabetical order, after the ellipsis if there is one (torch's rule)."""
    eq = n.args[0].replace(" ", "")
    if "->" not in eq:
        once = sorted(c for c in set(eq) if c.isalpha() and eq.count(c) == 1)
        eq = f"{eq}->{'...' if '...' in eq else ''}{''.join(once)}"
    lhs, out = eq.split("->")
    return lhs.split(","), out


EINSUM = targets(aten.einsum)
_WEIGHT_PRODUCTS = targets(aten.linear, aten.addmm)


def is_routed(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is ROUTED_FFN


def is_matmul(n: fx.Node) -> bool:
    """Matrix products, counting routefx's routed FFN op (a fused pair of products)."""
    return n.op == "call_function" and (n.target in MATMUL or is_grouped_mm(n) or n.target is ROUTED_FFN)


def val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def is_identity(n: fx.Node) -> bool:
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.target in IDENTITY:
        return not (n.target in targets(aten.dropout) and len(n.args) > 2 and n.args[2])
    if n.target in CASTS:
        a, b = val(n.args[0]), val(n)
        return a is not None and b is not None and a.dtype == b.dtype
    if n.target == aten.slice.Tensor:   # x[:, :] (Gemma 4 slices the stream whole before its KV-sharing layers)
        a, b = val(n.args[0]), val(n)
        step = n.args[4] if len(n.args) > 4 else n.kwargs.get("step", 1)
        start = n.args[2] if len(n.args) > 2 else n.kwargs.get("start")
        return (a is not None and b is not None and step == 1 and start in (0, None)
                and str(a.shape) == str(b.shape))
    return False


def root(n):
    """Look back through identity nodes."""
    while isinstance(n, fx.Node) and is_identity(n):
        n = n.args[0]
    return n


def root_casts(n):
    """Look back through identity nodes and floating dtype casts (the same values in another precision: a residual
    stream kept in float32 in a bf16 model)."""
    while isinstance(n, fx.Node) and (is_identity(n) or is_cast(n)):
        n = n.args[0]
    return n


def root_views(n):
    """Look back through identity and reshape-only nodes."""
    while isinstance(n, fx.Node) and (is_identity(n) or (n.op == "call_function" and n.target in VIEWS)):
        n = n.args[0]
    return n


def is_cast(n) -> bool:
    """A cast from one floating dtype to another and nothing else (`x.float()`, `w.to(torch.float32)`): no device,
    layout or memory-format change."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in _DTYPE_CASTS \
            or len(n.args) > 2 or not isinstance(n.args[0], fx.Node):
        return False
    if any(v is not None for k, v in n.kwargs.items() if k not in ("dtype", "copy", "non_blocking")):
        return False
    a, b = val(n.args[0]), val(n)
    return a is not None and b is not None and a.device == b.device and a.is_floating_point() \
        and b.is_floating_point()


def forward_views(n: fx.Node) -> fx.Node:
    """Follow single-user identity and reshape-only nodes forward."""
    while len(n.users) == 1:
        u = next(iter(n.users))
        if (is_identity(u) or (u.op == "call_function" and u.target in VIEWS)) and u.args[0] is n:
            n = u
        else:
            break
    return n


def ancestors(nodes: Iterable[fx.Node], stop: set | None = None) -> set[fx.Node]:
    """All nodes that reach any of `nodes` (exclusive), not expanding past nodes in `stop`."""
    seen: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if stop is None or n not in stop:
            stack.extend(n.all_input_nodes)
    return seen


def descendants(n: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(n.users)
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(m.users)
    return seen


def between(src: fx.Node, dst: fx.Node) -> set[fx.Node]:
    """Nodes on some path src -> dst, both ends excluded."""
    return descendants(src) & ancestors([dst])


def dynamic_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on a model input's values (everything else is weights and constants, and values computed
    from an input's sizes alone: a bias expanded to the input's shape is a constant term of a residual sum)."""
    dyn: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            if val(n) is not None:
                dyn.add(n)
        elif n.op == "call_function" and n.target not in _SIZE_QUERIES and any(a in dyn for a in n.all_input_nodes):
            dyn.add(n)
    return dyn


_SIZE_QUERIES = (torch.ops.aten.sym_size.int,)


def weight_only_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from stored weights alone: `get_attr`s and the ops that read nothing else (a norm's
    `weight.float()`, an activation's learned `softplus(p)`). Unlike the complement of `dynamic_nodes`, no value
    computed from an input's sizes."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes
                                  and all(a in out for a in n.all_input_nodes)):
            out.add(n)
    return out


def module_path(n: fx.Node) -> str | None:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def common_path(nodes: Iterable[fx.Node]) -> str | None:
    """Longest common dotted module path of `nodes` (None when no node carries `nn_module_stack`)."""
    paths = [p.split(".") for p in (module_path(n) for n in nodes) if p is not None]
    if not paths:
        return None
    prefix = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(prefix), len(p)) and prefix[i] == p[i]:
            i += 1
        prefix = prefix[:i]
    return ".".join(prefix) or None


def is_getitem(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is operator.getitem


_FILL_ARG = {torch.ops.aten.full_like.default: 1, torch.ops.aten.full.default: 1}  # op -> position of its value
_FILL_CONST = {torch.ops.aten.zeros_like.default: 0, torch.ops.aten.zeros.default: 0,
               torch.ops.aten.ones_like.default: 1, torch.ops.aten.ones.default: 1}


def constant_route(routes) -> int | None:
    """The route id every token takes when `routes` (routed_ffn's second argument) is a constant fill (Dense, a
    static router), else None. The one test for it: FLOP counting, the backends' lowering and ONNX export."""
    if not isinstance(routes, fx.Node) or routes.op != "call_function":
        return None
    if routes.target in _FILL_CONST:
        return _FILL_CONST[routes.target]
    if routes.target not in _FILL_ARG:
        return None
    i = _FILL_ARG[routes.target]
    value = routes.args[i] if len(routes.args) > i else routes.kwargs.get("fill_value")
    return int(value) if isinstance(value, (int, float, bool)) else None


def fake_mode(gm: fx.GraphModule):
    """The FakeTensorMode of the graph's fake values (meta["val"], as torch.export leaves them), or None."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and getattr(v, "fake_mode", None) is not None:
            return v.fake_mode
    return None


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Put `new` in `old`'s place: `new` takes `old`'s metadata and users, and `old` leaves the graph."""
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)
