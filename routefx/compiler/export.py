"""`routefx.export(cm, path)`: write an ahead-of-time artifact that `routefx.load` runs with numpy and onnxruntime.

The artifact is a directory (format: `routefx/runtime/artifact.py`):
    manifest.json          format and version, routefx version, policy, plan summary, input and output specs,
                           FLOPs per token and realised budget, ORT session settings, sha256 of every other file
    model.onnx             the compiled graph (ONNX, plus ONNX Runtime's com.microsoft CPU kernels where the
                           backend's fusions placed them), weights as external data in model.onnx.data
    model.opt.onnx         the same after ONNX Runtime's graph optimizations at a portable level (EXTENDED: CPU
                           fusions into com.microsoft ops, no hardware-specific layout transforms); `load` opens it
                           with optimizations off, skipping re-optimisation. Weights are stored once: its
                           initializers that hold the same bytes as one of model.onnx's point into model.onnx.data;
                           model.opt.onnx.data holds only the tensors ONNX Runtime created (folded constants), and is absent when
                           there are none
    plan/                  the plan (`Plan.save`: plan.json + tensors.safetensors)

Models compiled with `backend="onnx"` export as above (the graph ONNX Runtime runs is the one exported); models
compiled with backend="inductor" or "triton" export an AOTInductor package instead (`model.pt2`, manifest
"kind": "aoti"; see `routefx/compiler/export_aoti.py`). The input form exported is the compiled model's most
recent one (e.g. with or without `attention_mask`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import inspect as _inspect
import json
import mmap
import os
import shutil
import tempfile

import onnx
import onnxruntime as ort
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
import torch

from routefx.compiler.validate import input_spec
from routefx.runtime.size_guards import check_supported
from routefx.errors import ArtifactError, BackendError, UnsupportedModelError
from routefx.generate.settings import artifact_settings
from routefx.runtime.artifact import (FORMAT, GEN_DECODE, GEN_PREFILL, MANIFEST, MODEL, MODEL_DATA, OPT_LEVEL,
                                      OPT_MODEL, OPT_MODEL_DATA, VERSION, manifest_checksum, sha256_file)

__all__ = ["export"]

_JSON_SCALARS = (bool, int, float, str, type(None))


def export(cm, path: str, *, overwrite: bool = False, generate: bool = False) -> str:
    """Write `cm` (a `CompiledModel` with backend="onnx", already compiled) as an artifact directory at `path`;
    returns `path`. Refuses an existing non-empty directory unless `overwrite=True`. `generate=True` adds the
    prefill and decode graphs (`routefx/runtime/generate.py` runs them: `routefx.load(path).generate(ids)`)."""
    if generate and cm.backend != "onnx":
        raise BackendError(f"routefx.export(generate=True) writes ONNX prefill and decode graphs: compile with "
                           f"backend=\"onnx\" (this model was compiled with backend={cm.backend!r})")
    if cm.backend not in ("onnx", "inductor", "triton"):
        raise BackendError(f"routefx.export writes ONNX artifacts (backend=\"onnx\") and AOTInductor packages "
                           f"(backend=\"inductor\" or \"triton\"); this model was compiled with backend="
                           f"{cm.backend!r}")
    entry = cm._require("routefx.export writes the compiled graph, which does not exist yet")
    runner = entry.run
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise ArtifactError(f"{path} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".routefx_export_", dir=parent)   # same filesystem: the final rename is atomic
    try:
        if cm.backend == "onnx":
            _write_model(runner, tmp)
            routed = not runner.session.get_session_options().enable_mem_pattern
            _write_optimized(tmp, routed)
            manifest = _manifest(cm, entry, runner, routed)
            if generate:
                manifest["generation"] = _write_generation(cm, tmp)
        else:
            manifest = _aoti_manifest(cm, entry, runner, tmp)
        entry.plan.save(os.path.join(tmp, "plan"))
        manifest["files"] = {rel: sha256_file(os.path.join(tmp, rel)) for rel in _files(tmp)}
        manifest["checksum"] = manifest_checksum(manifest)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _files(root: str) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for n in names]
    return sorted(r for r in out if r != MANIFEST)


def _write_model(runner, directory: str, name: str = MODEL, data: str = MODEL_DATA) -> None:
    """The runner's ONNX model with every initializer as external data in one file."""
    if runner.onnx_model is not None:
        model = onnx.load_model_from_string(runner.onnx_model)
    else:
        model = onnx.load(runner.onnx_path)           # loads its external data too
    onnx.save_model(model, os.path.join(directory, name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


def _write_generation(cm, directory: str) -> dict:
    """The prefill and decode graphs (`routefx.generate.graphs`, the plan of `cm`) as GEN_PREFILL / GEN_DECODE,
    their weights shared with model.onnx.data where the bytes are equal; returns the manifest's "generation"."""
    from routefx.generate.graphs import generation_graphs
    from routefx.generate.step import supports_cache
    if (why := supports_cache(cm._model)) is not None:
        raise UnsupportedModelError(f"routefx.export(generate=True) captures a KV cache: {why}")
    graphs = generation_graphs(cm)
    # a recurrent layer's prefill is valid for some prompt lengths only (captured again per length in process)
    graphs.layout.refuse_recurrent(cm._model, "routefx.export(generate=True) (one prefill graph for every length)",
                                   indexer_ok=True)
    out: dict = {"past": graphs.past_names}
    for key, graph, name in (("prefill", graphs.prefill, GEN_PREFILL), ("decode", graphs.decode, GEN_DECODE)):
        runner = graph.run
        _write_model(runner, directory, name, name + ".data")
        _share_weights(directory, name, name + ".data")
        names = [i.name for i in runner.inputs]
        out[key] = {"file": name, "routed": not runner.session.get_session_options().enable_mem_pattern,
                    "inputs": names, "outputs": list(runner.output_names),
                    "guards": _guards(graph.guards, list(graph.guards.names), {}, f"the {key} graph")}
    out.update(artifact_settings(cm._model))
    return out


def _write_optimized(directory: str, routed: bool) -> None:
    """Let ONNX Runtime optimize model.onnx once, at a portable level, and save the result."""
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVEL
    so.enable_mem_pattern = not routed
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(directory, OPT_MODEL)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPT_MODEL_DATA)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(os.path.join(directory, MODEL), sess_options=so, providers=["CPUExecutionProvider"])
    if not os.path.exists(os.path.join(directory, OPT_MODEL_DATA)):   # a model without initializers
        open(os.path.join(directory, OPT_MODEL_DATA), "wb").close()
    _share_weights(directory, OPT_MODEL, OPT_MODEL_DATA)


_ALIGN = 4096   # tensors start on page boundaries in the data files, so ONNX Runtime can map them


def _share_weights(directory: str, name: str, own_data: str) -> None:
    """Store every weight once: point the external initializers of model `name` (the optimized model, the
    generation graphs) whose bytes equal one of model.onnx's at that tensor in model.onnx.data, and rewrite its
    own data file `own_data` with the others only (removed when none are left)."""
    plain = onnx.load(os.path.join(directory, MODEL), load_external_data=False)
    opt_path, opt_data = os.path.join(directory, name), os.path.join(directory, own_data)
    opt = onnx.load(opt_path, load_external_data=False)
    known: dict[bytes, tuple[int, int]] = {}                    # sha256 of the bytes -> (offset, length) in MODEL_DATA
    with _mapped(os.path.join(directory, MODEL_DATA)) as data:
        for t in _external(plain):
            start, stop = _span(t, len(data))
            known.setdefault(hashlib.sha256(data[start:stop]).digest(), (start, stop - start))
    with _mapped(opt_data) as old, open(opt_data + ".tmp", "wb") as new:
        for t in _external(opt):
            start, stop = _span(t, len(old))
            raw = old[start:stop]
            hit = known.get(hashlib.sha256(raw).digest())
            if hit is not None:
                _point(t, MODEL_DATA, *hit)
                continue
            new.write(b"\0" * (-new.tell() % _ALIGN))
            offset = new.tell()
            new.write(raw)
            _point(t, own_data, offset, len(raw))
    os.replace(opt_data + ".tmp", opt_data)
    if os.path.getsize(opt_data) == 0:                       # every tensor shared: no second data file
        os.remove(opt_data)
    with open(opt_path, "wb") as f:
        f.write(opt.SerializeToString())


def _span(t: onnx.TensorProto, size: int) -> tuple[int, int]:
    info = ExternalDataInfo(t)
    start = int(info.offset or 0)
    return start, start + int(info.length) if info.length is not None else size


def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)


def _external(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if uses_external_data(t)]


class _mapped:
    """A read-only mmap of a file (an empty file maps to b"")."""

    def __init__(self, path: str):
        self._f = open(path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self._m = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def __enter__(self):
        return self._m if self._m is not None else b""

    def __exit__(self, *exc):
        if self._m is not None:
            self._m.close()
        self._f.close()


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _positional(model, names: list[str]) -> list[str]:
    """The model's forward parameters, in order, up to the first one that is not an input of the artifact."""
    out = []
    for p in _inspect.signature(model.forward).parameters.values():
        if p.name not in names or p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        out.append(p.name)
    return out


def _input_spec(cm, entry, runner) -> dict:
    spec = input_spec(entry.gm)
    onnx_inputs = [i.name for i in runner.inputs]
    by_name = {t.name: t for t in spec.tensors}
    tensors = []
    for name in onnx_inputs:
        t = by_name[name]
        tensors.append({"name": name, "dtype": _dtype(t.dtype), "shape": list(t.shape), "vocab": t.vocab,
                        "absent": "ones" if _mask_of_ones_when_absent(cm._model, name, t) else None})
    constants = dict(getattr(runner, "_constants", {}))
    constants.update(spec.bound)
    bad = {k: type(v).__name__ for k, v in constants.items() if not isinstance(v, _JSON_SCALARS)}
    if bad:
        raise ArtifactError(f"the model was captured with non-scalar constant inputs {bad}; an artifact stores "
                            "bool/int/float/str/None constants only")
    return {"tensors": tensors, "constants": constants, "positional": _positional(cm._model, onnx_inputs)}


def _mask_of_ones_when_absent(model, name: str, t) -> bool:
    """Whether a call without input `name` means a tensor of ones: a Hugging Face model's `attention_mask`
    ([batch, length], optional in its forward), which its documentation defines as every token attended."""
    from routefx.ir.capture import _is_hf
    if name != "attention_mask" or not _is_hf(model) or len(t.shape) != 2 or not all(isinstance(d, str)
                                                                                        for d in t.shape):
        return False
    param = _inspect.signature(model.forward).parameters.get(name)
    return param is not None and param.default is None


def _tree(spec) -> dict:
    """A torch pytree spec as JSON: {"leaf": i} or {"type", "class", "keys", "children"}."""
    if spec.is_leaf():
        return {"leaf": None}
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    node = {"children": [_tree(c) for c in children]}
    t = spec.type
    if t in (tuple, list):
        node["type"] = t.__name__
    elif t is dict or (isinstance(t, type) and issubclass(t, dict)):
        node["type"] = "dict"
        node["keys"] = [str(k) for k in spec.context]
        if t is not dict:
            node["class"] = f"{t.__module__}:{t.__qualname__}"
    else:
        raise ArtifactError(f"the model's output holds a {t.__module__}.{t.__qualname__}; an artifact rebuilds "
                            "tensors, tuples, lists, dicts and Hugging Face ModelOutputs")
    return node


def _output_spec(runner) -> dict:
    leaves = []
    outputs = iter(runner.output_names)
    for leaf in runner._leaves:
        if leaf is True:
            leaves.append({"onnx": next(outputs)})
        elif isinstance(leaf, _JSON_SCALARS):
            leaves.append({"const": leaf})
        else:
            raise ArtifactError(f"the model's output holds a constant {type(leaf).__name__}; an artifact stores "
                                "tensors and bool/int/float/str/None constants")
    tree = {"leaf": None} if runner._out_spec is None else _tree(runner._out_spec)
    counter = iter(range(len(leaves)))

    def number(node):
        if "leaf" in node:
            node["leaf"] = next(counter)
        for c in node.get("children", ()):
            number(c)
    if runner._out_spec is None and len(leaves) > 1:
        tree = {"type": "tuple", "children": [{"leaf": None} for _ in leaves]}
    number(tree)
    return {"leaves": leaves, "tree": tree}


def _aoti_manifest(cm, entry, runner, directory: str) -> dict:
    from routefx.compiler.export_aoti import _examples, write_package
    spec = input_spec(entry.gm)
    tensors = [{"name": t.name, "dtype": _dtype(t.dtype), "shape": list(t.shape), "vocab": t.vocab}
               for t in spec.tensors]
    info = entry.gm.meta.get("routefx")
    constants = dict(getattr(info, "constant_kwargs", {}) or {})
    bad = {k: type(v).__name__ for k, v in {**constants, **spec.bound}.items() if not isinstance(v, _JSON_SCALARS)}
    if bad:
        raise ArtifactError(f"the model was captured with non-scalar constant inputs {bad}; an artifact stores "
                            "bool/int/float/str/None constants only")
    baked = {**constants, **spec.bound}
    guards = _guards(entry.guards, [t["name"] for t in tensors], baked, "the model's graph")
    aoti = write_package(runner.graph_module, tensors, constants, directory, guards, baked)
    with torch.no_grad():                     # the output structure, from one call of the lowered graph
        device = torch.device(aoti["device"])
        example = dict(zip([t["name"] for t in tensors], _examples(tensors, device, guards, baked)))
        out = runner.graph_module(**example, **constants)
    leaves, tree = torch.utils._pytree.tree_flatten(out)
    n = iter(range(len(leaves)))
    outputs = {"leaves": [{"aoti": next(n)} if isinstance(v, torch.Tensor) else {"const": v} for v in leaves],
               "tree": _numbered(_tree(tree))}
    m = _manifest_common(cm, entry)
    m.update({"kind": "aoti", "aoti": aoti, "outputs": outputs, "guards": guards,
              "inputs": {"tensors": tensors, "constants": baked,
                         "positional": _positional(cm._model, [t["name"] for t in tensors])}})
    return m


def _numbered(tree: dict) -> dict:
    counter = iter(range(1 << 30))

    def number(node):
        if "leaf" in node:
            node["leaf"] = next(counter)
        for c in node.get("children", ()):
            number(c)
    number(tree)
    return tree


def _version() -> str:
    try:
        return importlib.metadata.version("routefx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _manifest(cm, entry, runner, routed: bool) -> dict:
    m = _manifest_common(cm, entry)
    inputs = _input_spec(cm, entry, runner)
    m.update({"kind": "onnx", "inputs": inputs, "outputs": _output_spec(runner),
              "session": {"routed": routed, "optimized_level": "extended"},
              "guards": _guards(entry.guards, [t["name"] for t in inputs["tensors"]], inputs["constants"],
                                "the model's graph")})
    return m


def _guards(guards, inputs: list[str], constants: dict, what: str) -> list[str]:
    """The input sizes a graph holds for (`routefx.runtime.size_guards`), as the runtime checks them; refuses a
    graph whose guards the runtime cannot evaluate (it would run the graph outside them)."""
    if guards.code is None:
        raise UnsupportedModelError(f"{what} holds for some input sizes only (torch.export's guards) and this torch "
                                    "does not give them as source, so the runtime could not check them")
    code = list(dict.fromkeys(guards.code))
    if (bad := check_supported(code, inputs, constants)) is not None:
        raise UnsupportedModelError(f"{what} holds for some input sizes only, and the runtime cannot check one of "
                                    f"torch.export's guards: {bad}")
    return code


def _manifest_common(cm, entry) -> dict:
    budget = entry.plan.budget
    return {
        "format": FORMAT, "version": VERSION, "routefx_version": _version(),
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "model_class": type(cm._model).__name__,
        "policy": cm.policy.to_dict(),
        "plan": {"pruned": entry.plan.pruned, "lam": entry.plan.lam,
                 "layers": {k: v.summary() for k, v in entry.plan.layers.items()}},
        "flops_per_token": entry.report.flops_per_token,
        "realised_budget": None if budget is None else budget.to_dict(),
    }
