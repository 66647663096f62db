"""`torch.compile(model, backend="routefx", options={...})`: routefx as a Dynamo backend.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so torch finds it by name without
routefx being imported. Options: `policy` (a policy or a `Plan`; default Dense), `calibration` (batches, as for
`routefx.compile`), `target` ("eager" | "onnx" | "triton"; default "eager"), `backend_options` (the target's
options, as `routefx.compile(..., backend_options=)`; checked before anything is compiled).

Dynamo hands the backend torch-level FX graphs, one per piece between graph breaks, whose parameters are graph
inputs. Each piece is wrapped back into an `nn.Module` that owns those parameters under their names in the user's
model (read from Dynamo's input sources, e.g. `L['self']._modules['model']..._parameters['weight']` ->
`model....weight`), and handed to `routefx.compile`, which re-captures it with torch.export, recognises its blocks
and rewrites it. A piece without transformer blocks, or one routefx refuses, runs as Dynamo gave it; every
decision is logged on the `routefx.dynamo` logger and kept in `compiled_pieces()`.

Calibration runs once per piece. Dynamo's default (`dynamic` not given) first hands a piece specialised to the
shapes of its first call; routefx compiles that static graph as it is (it runs only at those shapes: Dynamo's
guards say so). On a call at other shapes Dynamo recompiles the piece once with dynamic batch/sequence dims
(automatic dynamic shapes); routefx compiles that graph with the plan calibrated the first time, and every later
graph of the same piece (a batch of 1, another length) reuses the dynamic compiled model. A piece is "the same"
when the options, its parameters, its inputs and its sequence of tensor operations agree (`_key`). Calibration
batches name the model's inputs; a piece's inputs are matched to them by keyword name, and inputs the model
received by position take the batch's remaining keys in order. A static piece can only run calibration batches of
its own shapes: when a policy needs calibration and the batches have other shapes, the piece is refused with a
`BackendError` (pass `dynamic=True`, or the Plan of an earlier `routefx.compile`). Compiled pieces are cached
in this process until `torch._dynamo.reset()`. Routing adds no recompilation: routed FFNs live inside the compiled
piece, which Dynamo sees as one opaque call.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import fx, nn
from torch.fx import traceback as fx_traceback

from routefx.backends import configure
from routefx.errors import BackendError, RoutefxError

__all__ = ["routefx_backend", "compiled_pieces", "PieceRecord"]

log = logging.getLogger("routefx.dynamo")

_ATTR = re.compile(r"\._(modules|parameters|buffers)\['([^']+)'\]")
_INPUT = re.compile(r"^L\['(?:args|kwargs)'\]\[(?:'([^']+)'|(\d+))\]$|^L\['([^']+)'\]$")


@dataclasses.dataclass
class PieceRecord:
    inputs: tuple[str, ...]
    compiled: bool
    reason: str                       # what was compiled (blocks, policy, target), or why the piece runs as is
    model: object = None              # the routefx CompiledModel


_RECORDS: list[PieceRecord] = []
# piece key (see `_key`) -> [(form (see `_form`), the CompiledModel made for a graph of that form)]
_COMPILED: dict[tuple, list] = {}
_PLANS: dict[tuple, object] = {}      # piece key -> the Plan calibrated (or given) for it


def compiled_pieces() -> list[PieceRecord]:
    """Every piece the backend was given in this process, in order, with what was done with it."""
    return list(_RECORDS)


def _source(node: fx.Node) -> str | None:
    arg = node.meta.get("grapharg")
    src = getattr(arg, "source", None)
    return src.name() if callable(getattr(src, "name", None)) else getattr(src, "name", None)


def _slots(gm: fx.GraphModule, example_inputs) -> list[tuple]:
    """Per placeholder: ("param", dotted name, tensor) | ("input", name, index among positional inputs or None)
    | ("sym", input name, dim) | ("const", source, value): a module attribute, fixed for the model."""
    slots, seen = [], {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        value, src = example_inputs[i], _source(node) or node.name
        attrs = _ATTR.findall(src)
        if attrs and attrs[-1][0] in ("parameters", "buffers"):
            slots.append(("param", ".".join(key for _, key in attrs), value))
            continue
        if re.match(r"^(.*)\.size\(\)\[(\d+)\]$", src):
            slots.append(("sym", src, None))          # resolved below, once every input is named
            continue
        m = _INPUT.match(src)
        if m is None or not isinstance(value, torch.Tensor):
            # a module attribute (a norm's eps), a global (math.pi) or another value of the program that
            # Dynamo made a graph input: fixed for this model, baked in at the value Dynamo saw
            slots.append(("const", src, value))
            continue
        name = re.sub(r"\W", "_", m.group(1) or m.group(3) or node.name).strip("_")
        pos = int(m.group(2)) if m.group(2) is not None else None
        if m.group(2) is not None:
            name = re.sub(r"\W", "_", node.name).strip("_")
        seen[src] = name
        slots.append(("input", name, pos))
    out = []
    for slot, node in zip(slots, (n for n in gm.graph.nodes if n.op == "placeholder")):
        if slot[0] != "sym":
            out.append(slot)
            continue
        m = re.match(r"^(.*)\.size\(\)\[(\d+)\]$", slot[1])
        if m is None or m.group(1) not in seen:
            raise BackendError(f"graph input {node.name} (source {slot[1]}) is a scalar routefx cannot derive from "
                               "a tensor input's shape")
        out.append(("sym", seen[m.group(1)], int(m.group(2))))
    return out


def _piece_module(gm: fx.GraphModule, slots: list[tuple]) -> nn.Module:
    """An nn.Module owning the piece's parameters under their model names; forward(<inputs>) runs `gm`."""
    inputs = [s[1] for s in slots if s[0] == "input"]
    ns: dict = {}
    params = ", ".join(inputs)
    exec(f"def forward(self, {params}):\n    return self._run(dict({', '.join(f'{n}={n}' for n in inputs)}))",
         ns)                                                            # a named signature for routefx.compile
    piece = type("DynamoPiece", (nn.Module,), {"forward": ns["forward"], "_run": _run})()
    _name_modules_(gm)
    object.__setattr__(piece, "_graph", gm)                             # not a submodule: no names added
    object.__setattr__(piece, "_slots", slots)
    for kind, name, value in slots:
        if kind != "param":
            continue
        owner = piece
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part) or not isinstance(getattr(owner, part), nn.Module):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    return piece.eval()


_ROOT = re.compile(r"^L\['[^']+'\](?:\[[^\]]+\])*")


def _clean_path(path: str) -> str:
    """Dynamo's module path ("L['self'].model.layers[0].mlp", "L['args'][0]._modules['model']...") as the dotted
    name in the model ("model.layers.0.mlp")."""
    path = _ROOT.sub("", path)
    path = re.sub(r"\._modules\['([^']+)'\]|\[['\"]?([^\]'\"]+)['\"]?\]", lambda m: "." + (m.group(1) or m.group(2)),
                  path)
    return path.lstrip(".")


def _name_modules_(gm: fx.GraphModule) -> None:
    """Rewrite the graph's nn_module_stack paths to the model's dotted names (recognition names blocks by them)."""
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            n.meta["nn_module_stack"] = {k: (_clean_path(v[0]), v[1]) for k, v in stack.items()}


def _run(self, kw: dict):
    args = []
    for kind, name, extra in self._slots:
        if kind == "param":
            args.append(self.get_parameter(name) if isinstance(extra, nn.Parameter) else self.get_buffer(name))
        elif kind == "const":
            args.append(extra)
        elif kind == "input":
            args.append(kw[name])
        else:
            args.append(kw[name].shape[extra])
    # the Interpreter runs each node under its metadata, so the re-capture's nodes keep their module paths
    with fx_traceback.preserve_node_meta():
        return fx.Interpreter(self._graph).run(*args)


def _calibration_for(batches, slots) -> list[dict] | None:
    """The calibration batches in the piece's input names (see the module docstring); None when they don't fit."""
    if batches is None:
        return None
    inputs = [(s[1], s[2]) for s in slots if s[0] == "input"]
    out = []
    for batch in batches:
        batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
        named = {n: batch[n] for n, pos in inputs if pos is None and n in batch}
        rest = iter(k for k in batch if k not in named)
        for n, pos in inputs:
            if n not in named:
                key = next(rest, None)
                if key is None:
                    return None
                named[n] = batch[key]
        out.append(named)
    return out


def _is_static(slots) -> bool:
    return not any(s[0] == "sym" for s in slots)


def _form(gm: fx.GraphModule, slots, args) -> tuple:
    """Per input, its shape with None for each dim the graph keeps dynamic: (2, None) is a graph specialised to a
    batch of 2 for any length. A dim is dynamic when the placeholder's example value has a symbolic size there, or
    when Dynamo passes its size as a graph input."""
    sym = {(s[1], s[2]) for s in slots if s[0] == "sym"}
    out = []
    for s, a, node in zip(slots, args, (n for n in gm.graph.nodes if n.op == "placeholder")):
        if s[0] != "input":
            continue
        ev = node.meta.get("example_value")
        shape = ev.shape if isinstance(ev, torch.Tensor) else a.shape
        out.append(tuple(None if isinstance(d, torch.SymInt) or (s[1], i) in sym else int(d)
                         for i, d in enumerate(shape)))
    return tuple(out)


def _covers(general: tuple, form: tuple) -> bool:
    """Whether a graph of `general` form runs every input of `form` (each dim dynamic there, or the same size)."""
    return len(general) == len(form) and all(
        len(g) == len(f) and all(a is None or a == b for a, b in zip(g, f)) for g, f in zip(general, form))


def routefx_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """The Dynamo backend (see the module docstring). Returns a callable that runs the piece."""
    from routefx.compiler.plan import Plan
    from routefx.compiler.policies import Dense, Policy

    options = dict(options or {})
    unknown = sorted(set(options) - {"policy", "calibration", "target", "backend_options"})
    if unknown:
        raise BackendError(f"unknown routefx backend option(s) {unknown}; supported: policy, calibration, target, "
                           "backend_options")
    policy = options.get("policy", Dense())
    target = options.get("target", "eager")
    configure(target, options.get("backend_options"))  # an unknown target or option: an error now, not a fallback
    if not isinstance(policy, (Policy, Plan)):
        raise BackendError(f"option 'policy' must be a routefx policy or Plan, got {type(policy).__name__}")
    slots = _slots(gm, example_inputs)
    compiled: dict = {}
    where = [i for i, s in enumerate(slots) if s[0] == "param"]

    # routefx.compile runs torch.export, which must not run inside Dynamo's compilation of the frame: the piece
    # is compiled on its first call, with that call's inputs as the example. Dynamo passes the parameters on
    # every call and reuses this graph for another model of the same class: weights are baked into the
    # compiled piece, so other parameter tensors get (or reuse) their own compiled piece.
    def run(*args):
        params = tuple(id(args[i]) for i in where)
        if params not in compiled:
            own = [(s[0], s[1], a) if s[0] == "param" else s for s, a in zip(slots, args)]
            compiled[params] = _compile_piece(gm, own, args, policy, options, target, _key(gm, own, options),
                                              _form(gm, own, args))
        return compiled[params](*args)
    return run


_SHAPE_OPS = ("sym_size", "size", "getitem", "add", "sub", "mul", "floordiv", "truediv", "eq", "ne", "lt", "le",
              "gt", "ge", "sym_", "_assert")


def _key(gm: fx.GraphModule, slots, options: dict) -> tuple:
    """What makes two graphs Dynamo hands over the same piece: the options, the parameters and inputs by name, and
    the sequence of tensor operations (shape arithmetic left out: Dynamo's re-specialisations differ only there)."""
    ops = tuple(str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
                if n.op in ("call_function", "call_method", "call_module")
                and not str(getattr(n.target, "__name__", n.target)).startswith(_SHAPE_OPS))
    # ids of objects the cached compiled model keeps alive (its parameters, the options): never reused meanwhile
    return (id(options.get("policy")), id(options.get("calibration")), options.get("target", "eager"),
            repr(sorted((options.get("backend_options") or {}).items())),
            tuple(s[1] for s in slots if s[0] in ("param", "input")),
            tuple(id(s[2]) for s in slots if s[0] == "param"), ops)


def _compile_piece(gm, slots, args, policy, options, target, key, form):
    import routefx
    from routefx.compiler.policies import Policy

    names = tuple(s[1] for s in slots if s[0] == "input")
    for general, cm in _COMPILED.get(key, ()):     # a more dynamic graph of this piece serves this one
        if _covers(general, form):
            log.info("routefx: piece with inputs %s seen again (new shapes); its compiled model is reused",
                     list(names))
            _RECORDS.append(PieceRecord(names, True, "reused the compiled model of the same piece", cm))
            return _runner(cm, slots)
    piece = _piece_module(gm, slots)
    examples = {s[1]: x for s, x in zip(slots, args) if s[0] == "input"}
    calibration = None
    plan = _PLANS.get(key)
    if plan is not None:               # Dynamo recompiled a piece routefx compiled already: its plan, no calibration
        policy = plan
    elif isinstance(policy, Policy) and policy.needs_calibration:
        calibration = _calibration_for(options.get("calibration"), slots)
        if calibration is None:
            return _as_is(gm, names, f"{policy!r} needs calibration data for this piece's inputs {list(names)}; "
                                     "the calibration batches do not provide them")
        _check_static_calibration(calibration, form, policy)
    try:
        cm = routefx.compile(piece, policy, example_kwargs=examples, example_inputs=(), calibration=calibration,
                             backend=target, backend_options=options.get("backend_options"))
    except RoutefxError as e:
        return _as_is(gm, names, f"{type(e).__name__}: {e}")
    if not cm.ir.blocks:  # Dense compiled a piece without blocks as captured: Dynamo's own graph runs it as well
        return _as_is(gm, names, f"NoBlocksError: {cm.report.notes[0]}")
    _COMPILED.setdefault(key, []).append((form, cm))
    _PLANS.setdefault(key, cm.plan)
    object.__setattr__(piece, "_options", (options.get("policy"), options.get("calibration")))   # keep ids live
    how = ("recompiled with the plan of the same piece (no calibration)" if plan is not None else
           f"{len(cm.ir.blocks)} transformer blocks compiled by {cm.policy!r}")
    reason = f"{how} for target {target!r}, input shapes {_shape_text(names, form)}"
    log.info("routefx: compiled a piece with inputs %s: %s", list(names), reason)
    _RECORDS.append(PieceRecord(names, True, reason, cm))
    return _runner(cm, slots)


def _shape_text(names, form) -> str:
    return ", ".join(f"{n}[{', '.join('*' if d is None else str(d) for d in f)}]" for n, f in zip(names, form))


def _check_static_calibration(calibration: list[dict], form: tuple, policy) -> None:
    """A graph Dynamo specialised to some sizes runs only calibration batches of those sizes."""
    names = list(calibration[0]) if calibration else []
    for batch in calibration:
        got = tuple(tuple(batch[n].shape) for n in names)
        if not _covers(form, got):
            raise BackendError(
                f"Dynamo specialised a piece to the shapes of its first call ({_shape_text(names, form)}; * = any "
                f"size) and {policy!r} needs calibration, whose batches have shapes "
                f"{_shape_text(names, got)}: a specialised graph runs its own shapes only. Call "
                "torch.compile(..., dynamic=True), or give as the policy the Plan of a routefx.compile calibrated on "
                "these batches")


def _runner(cm, slots):
    def run(*args):
        kw = {s[1]: a for s, a in zip(slots, args) if s[0] == "input"}
        out = cm(**kw)
        return out if isinstance(out, (tuple, list)) else (out,)
    return run


def _reset() -> None:
    """Forget every compiled piece (torch._dynamo.reset() and torch.compile's wrapper call this)."""
    _COMPILED.clear()
    _PLANS.clear()
    _RECORDS.clear()


routefx_backend.reset = _reset


def _as_is(gm: fx.GraphModule, names, reason: str):
    log.warning("routefx: a piece with inputs %s runs as Dynamo captured it: %s", list(names), reason)
    _RECORDS.append(PieceRecord(names, False, reason))
    return gm.forward
