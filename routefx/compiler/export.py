"""`routefx.export(cm, path)`: write an ahead-of-time artifact that `routefx.load` runs with numpy and onnxruntime.

The artifact is a directory (format: `routefx/runtime/artifact.py`):
    manifest.json          format and version, routefx version, policy, plan summary, input and output specs,
                           FLOPs per token and realised budget, ORT session settings, sha256 of every other file
    model.onnx             the compiled graph (standard ONNX ops), weights as external data in model.onnx.data
    model.opt.onnx         the same after ONNX Runtime's graph optimizations at a portable level (EXTENDED: CPU
                           fusions into com.microsoft ops, no hardware-specific layout transforms), weights in
                           model.opt.onnx.data; `load` opens it with optimizations off, skipping re-optimisation
    plan/                  the plan (`Plan.save`: plan.json + tensors.safetensors)

Only models compiled with `backend="onnx"` export (the graph ONNX Runtime runs is the one exported); the input
form exported is the compiled model's most recent one (e.g. with or without `attention_mask`).
"""
from __future__ import annotations

import importlib.metadata
import inspect as _inspect
import json
import os
import shutil
import tempfile

import onnx
import onnxruntime as ort
import torch

from routefx.compiler.validate import input_spec
from routefx.errors import ArtifactError, BackendError
from routefx.runtime.artifact import (FORMAT, MANIFEST, MODEL, MODEL_DATA, OPT_LEVEL, OPT_MODEL, OPT_MODEL_DATA,
                                      VERSION, manifest_checksum, sha256_file)

__all__ = ["export"]

_JSON_SCALARS = (bool, int, float, str, type(None))


def export(cm, path: str, *, overwrite: bool = False) -> str:
    """Write `cm` (a `CompiledModel` with backend="onnx", already compiled) as an artifact directory at `path`;
    returns `path`. Refuses an existing non-empty directory unless `overwrite=True`."""
    if cm.backend != "onnx":
        raise BackendError(f"routefx.export writes ONNX artifacts; this model was compiled with backend="
                           f"{cm.backend!r}. Compile it with backend=\"onnx\" to export it")
    entry = cm._require()
    runner = entry.run
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise ArtifactError(f"{path} exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".routefx_export_", dir=parent)   # same filesystem: the final rename is atomic
    try:
        _write_model(runner, tmp)
        routed = not runner.session.get_session_options().enable_mem_pattern
        _write_optimized(tmp, routed)
        entry.plan.save(os.path.join(tmp, "plan"))
        manifest = _manifest(cm, entry, runner, routed)
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


def _write_model(runner, directory: str) -> None:
    """The runner's ONNX model with every initializer as external data in one file."""
    if runner.onnx_model is not None:
        model = onnx.load_model_from_string(runner.onnx_model)
    else:
        model = onnx.load(runner.onnx_path)           # loads its external data too
    onnx.save_model(model, os.path.join(directory, MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=MODEL_DATA, size_threshold=1024)


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
        tensors.append({"name": name, "dtype": _dtype(t.dtype), "shape": list(t.shape), "vocab": t.vocab})
    constants = dict(getattr(runner, "_constants", {}))
    constants.update(spec.bound)
    bad = {k: type(v).__name__ for k, v in constants.items() if not isinstance(v, _JSON_SCALARS)}
    if bad:
        raise ArtifactError(f"the model was captured with non-scalar constant inputs {bad}; an artifact stores "
                            "bool/int/float/str/None constants only")
    return {"tensors": tensors, "constants": constants, "positional": _positional(cm._model, onnx_inputs)}


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


def _version() -> str:
    try:
        return importlib.metadata.version("routefx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _manifest(cm, entry, runner, routed: bool) -> dict:
    budget = entry.plan.budget
    return {
        "format": FORMAT, "version": VERSION, "routefx_version": _version(),
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "model_class": type(cm._model).__name__,
        "policy": cm.policy.to_dict(),
        "plan": {"pruned": entry.plan.pruned, "lam": entry.plan.lam,
                 "layers": {k: v.summary() for k, v in entry.plan.layers.items()}},
        "inputs": _input_spec(cm, entry, runner),
        "outputs": _output_spec(runner),
        "flops_per_token": entry.report.flops_per_token,
        "realised_budget": None if budget is None else budget.to_dict(),
        "session": {"routed": routed, "optimized_level": "extended"},
    }
