"""AOTInductor artifacts: `routefx.export` of a model compiled with backend="inductor" or "triton".

The artifact directory holds `manifest.json` (as for ONNX artifacts, with `"kind": "aoti"`), `model.pt2` and the
plan. `model.pt2` is `torch._inductor.aoti_compile_and_package` of the backend's lowered graph, re-exported with
dynamic batch and sequence dims; `torch._inductor.aoti_load_package(path + "/model.pt2")` loads it without
routefx's Python code (torch alone). The package takes the manifest's input tensors by position, in the
manifest's order (constants are baked in), and returns the manifest's output leaves as a flat tuple of tensors;
`manifest["outputs"]["tree"]` rebuilds the model's structure, as for ONNX artifacts.

Routed FFNs in the lowered graph:
- constant routes (Dense, a static router): already plain dense products on their range;
- `routefx_triton::routed_ffn` (backend "triton", CUDA): a `torch.library.triton_op`; AOTInductor compiles the
  Triton kernels it launches into the package;
- `routefx::routed_ffn` (backend "inductor": a Python custom op, which a package cannot call without routefx) is
  replaced for the package by its masked decomposition in torch ops (`_masked_routed_ffn`): every route's FFN is
  computed for every token and weighted by the token's route mask. Outputs equal the routed op's; the package
  does no less compute than a dense model (sum of the range widths per token), so it is a portable artifact, not
  a fast one. `manifest["aoti"]["decomposed_routed_ffns"]` says how many were replaced.
"""
from __future__ import annotations

import os

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from routefx.errors import ExportError

__all__ = ["write_package", "PACKAGE"]

PACKAGE = "model.pt2"
_ACC = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _masked_routed_ffn(x, routes, gates, w_up, w_gate, w_down, b_up, b_gate, b_down, ranges, activation):
    """`routefx::routed_ffn` in torch ops without data-dependent shapes: each range's FFN on every token, times
    the sum of that token's gates on routes to the range. x [..., d], routes/gates [..., K] -> [..., d]."""
    from routefx.ir.activations import get_activation
    act = get_activation(activation)
    acc = _ACC.get(x.dtype, x.dtype)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)                        # [..., d]
    for r in range(len(ranges) // 2):
        start, end = ranges[2 * r], ranges[2 * r + 1]
        if start == end:
            continue                                                            # an empty range adds exactly 0
        hit = (routes == r).to(acc)                                             # [..., K]
        weight = (hit if gates is None else hit * gates.to(acc)).sum(-1, keepdim=True)   # [..., 1]
        up = nn.functional.linear(x, w_up[start:end], None if b_up is None else b_up[start:end])
        if w_gate is None:
            h = act(up)
        else:
            h = act.glu(nn.functional.linear(x, w_gate[start:end], None if b_gate is None else b_gate[start:end]), up)
        y = nn.functional.linear(h, w_down[:, start:end], b_down)               # [..., d]
        out = out + weight * y.to(acc)
    return out.to(x.dtype)


def _decompose_python_ops(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` whose `routefx::routed_ffn` calls run `_masked_routed_ffn` (traced into torch ops)."""
    target = torch.ops.routefx.routed_ffn.default
    gm = fx.GraphModule(gm, gm.graph.__deepcopy__())
    gm.meta.update(getattr(gm, "meta", {}))
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (target, torch.ops.routefx.routed_ffn):
            node.target = _masked_routed_ffn
            n += 1
    gm.recompile()
    return gm, n


class _Flat(nn.Module):
    """forward(*tensors) -> tuple of the output's tensor leaves: the package's calling convention."""

    def __init__(self, gm: fx.GraphModule, names: list[str], constants: dict):
        super().__init__()
        self.gm = gm
        self._names, self._constants = names, constants

    def forward(self, *tensors):
        out = self.gm(**dict(zip(self._names, tensors)), **self._constants)
        return tuple(leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor))


def _examples(tensors: list[dict], device: torch.device) -> tuple:
    """Inputs of batch 2 and length 8 (neither 1, so neither is specialised): token ids 1, masks 1."""
    sizes = {"B": 2, "S": 8}
    out = []
    for t in tensors:
        shape = [sizes.get(d, 3) if isinstance(d, str) else d for d in t["shape"]]
        out.append(torch.ones(shape, dtype=getattr(torch, t["dtype"]), device=device))
    return tuple(out)


def write_package(gm: fx.GraphModule, tensors: list[dict], constants: dict, directory: str) -> dict:
    """Compile `gm` (a backend's lowered graph, called as gm(**inputs)) into directory/model.pt2; returns the
    manifest's "aoti" entry. Raises `ExportError` when torch.export or AOTInductor cannot compile it."""
    lowered, decomposed = _decompose_python_ops(gm)
    params = list(lowered.parameters()) + list(lowered.buffers())
    device = params[0].device if params else torch.device("cpu")
    names = [t["name"] for t in tensors]
    examples = _examples(tensors, device)
    auto = torch.export.Dim.AUTO
    dims = tuple({i: auto for i, d in enumerate(t["shape"]) if isinstance(d, str)} or None for t in tensors)
    try:
        with torch.no_grad():
            ep = torch.export.export(_Flat(lowered, names, constants).eval(), examples, dynamic_shapes=(dims,),
                                     strict=False)
    except Exception as e:  # torch.export raises many types
        raise ExportError(f"torch.export could not re-capture the lowered graph for AOTInductor: "
                          f"{type(e).__name__}: {_first(e)}") from e
    path = os.path.join(directory, PACKAGE)
    try:
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
    except Exception as e:  # Inductor raises many types
        raise ExportError(f"AOTInductor could not compile the graph ({device}): {type(e).__name__}: "
                          f"{_first(e)}") from e
    return {"package": PACKAGE, "device": device.type, "decomposed_routed_ffns": decomposed,
            "torch": torch.__version__}


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
