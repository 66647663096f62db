"""What each attention op attends to: causal or not, and any sliding window.

Read from the op's flags (`is_causal`) or, when the op takes a mask, by *evaluating* the mask construction: the
graph is cut down to the nodes that compute the masks and run on a probe of P positions with no padding. The
allowed pattern is then matched: all positions (bidirectional), the lower triangle (causal), or a band of width w
(sliding window w). A window of P or more positions reads as plain causal, which counts the same up to length P.

The probe runs on CPU whatever the model's device (its values are read back; a `meta` model has none): tensors the
mask construction reads from the model (rarely any) are copied to CPU for it, and a mask that needs values the
device cannot give (a `meta` buffer) reads as "custom".
"""
from __future__ import annotations

import dataclasses

import torch
import torch.utils._pytree as pytree
from torch import fx

from routefx.ir import graph_utils as gu

__all__ = ["MaskInfo", "attention_masks", "PROBE_POSITIONS"]

PROBE_POSITIONS = 64


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    causal: bool
    window: int | None = None    # keys per query at most (sliding window), None = unlimited
    pattern: str = "causal"      # "causal" | "bidirectional" | "sliding" | "custom"


def _sdpa_mask_and_flag(n: fx.Node):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    args = dict(zip(names, n.args)) | dict(n.kwargs)
    return args.get("attn_mask"), bool(args.get("is_causal", False))


def _probe_inputs(gm: fx.GraphModule, positions: int):
    """Placeholder values with batch 1 and `positions` tokens: ones for integer inputs, zeros otherwise."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seq_sym = None
    for n in phs:
        v = gu.val(n)
        if v is not None and v.dim() >= 2 and not isinstance(v.shape[1], int):
            seq_sym = str(v.shape[1])
            break
    out = []
    for n in phs:
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            out.append(v)
            continue
        shape = [positions if str(s) == seq_sym else (1 if i == 0 and not isinstance(s, int) else int(s))
                 for i, s in enumerate(v.shape)]
        out.append(torch.ones(shape, dtype=v.dtype) if not v.is_floating_point() else torch.zeros(shape, dtype=v.dtype))
    return out


def _classify(allowed: torch.Tensor) -> MaskInfo:
    """allowed: [P, P] bool (query i may attend key j)."""
    P = allowed.shape[-1]
    ones = torch.ones(P, P, dtype=torch.bool)
    if torch.equal(allowed, ones):
        return MaskInfo(False, None, "bidirectional")
    tril = torch.tril(ones)
    if torch.equal(allowed, tril):
        return MaskInfo(True, None, "causal")
    w = int(allowed[-1].sum())
    if 0 < w < P and torch.equal(allowed, tril & ~torch.tril(ones, diagonal=-w)):
        return MaskInfo(True, w, "sliding")
    return MaskInfo(False, None, "custom")


def attention_masks(gm: fx.GraphModule, positions: int = PROBE_POSITIONS) -> dict[fx.Node, MaskInfo]:
    """MaskInfo for every attention op of `gm`."""
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in gu.ATTENTION]
    result: dict[fx.Node, MaskInfo] = {}
    masked = {}
    for n in ops:
        mask, causal = _sdpa_mask_and_flag(n)
        if causal:
            result[n] = MaskInfo(True, None, "causal")
        elif mask is None:
            result[n] = MaskInfo(False, None, "bidirectional")
        else:
            masked[n] = mask
    if masked:
        positions = _static_length(gm) or positions      # a graph specialised to one length runs only that one
        values = _evaluate(gm, list(dict.fromkeys(masked.values())), positions)
        for n, m in masked.items():
            v = values.get(m)
            if v is None:
                result[n] = MaskInfo(False, None, "custom")
                continue
            allowed = v if v.dtype == torch.bool else v > torch.finfo(v.dtype).min / 2
            allowed = allowed.reshape(-1, positions, positions)[0]
            result[n] = _classify(allowed)
    return result


def _static_length(gm: fx.GraphModule) -> int | None:
    """The sequence length of the first input with a sequence dim, where the graph fixes it (else None)."""
    for n in gm.graph.nodes:
        v = gu.val(n) if n.op == "placeholder" else None
        if v is not None and v.dim() >= 2:
            return int(v.shape[1]) if isinstance(v.shape[1], int) else None
    return None


def _on_cpu(a):
    return torch.device("cpu") if isinstance(a, torch.device) else a


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], positions: int) -> dict:
    """Values of `nodes` on the probe, computing only what they need."""
    g = fx.Graph()
    env: dict = {}
    need = gu.ancestors(nodes) | set(nodes)
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (n in need and n.op in ("call_function", "get_attr")):
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
                    return {}
                setattr(mod, name, t.detach().to("cpu"))
    sub.recompile()
    try:
        with torch.no_grad():
            outs = sub(*_probe_inputs(gm, positions))
    except Exception:  # a mask we cannot evaluate on the probe: reported as "custom", counted as full
        return {}
    return {n: o for n, o in zip(nodes, outs) if isinstance(o, torch.Tensor) and o.device.type == "cpu"}
