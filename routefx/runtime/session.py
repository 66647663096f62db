"""`routefx.load(path)` / `Session(path)`: run an exported artifact with numpy and onnxruntime alone.

Loading verifies the manifest and every file's checksum first (`ArtifactError`), then opens ONNX Runtime on the
optimized model saved at export with graph optimizations off (they ran at export). Should that model not load
(an older ONNX Runtime without one of its fused ops), the plain `model.onnx` is opened with ORT's optimizations
instead; `session.source` says which.

A call validates its inputs as the compiled model does (`routefx/compiler/validate.py`: dtype and rank, static
dims, batch and sequence sizes agreeing between inputs, no empty batch or sequence, token ids in [0, vocab)) and
raises `InputError` naming the input; it refuses sizes outside the graph's guards too (the manifest's "guards":
a model whose code branches on a length was exported with one branch; `size_guards`). A Hugging Face model's
attention mask may be left out, as in the model: the artifact marks it (`"absent": "ones"`) and the session feeds
ones of the inputs' batch and length.
`Session.generate` decodes from artifacts exported with `generate=True` (`routefx/runtime/generate.py`). Inputs are numpy arrays, or torch tensors when torch is installed; with
torch inputs the outputs are torch tensors, otherwise numpy arrays. The output has the model's structure: a
Hugging Face ModelOutput (when transformers is already imported), else an `Output` (a dict with attribute access
and integer indexing, like ModelOutput), a tuple, a list, or a bare array.

A `Session` holds no per-call state: one session may be called from several threads at once (ONNX Runtime's
`InferenceSession.run` is thread-safe).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import onnxruntime as ort

from routefx.errors import ArtifactError, InputError
from routefx.runtime.artifact import MODEL, OPT_MODEL, PACKAGE, verify
from routefx.runtime.size_guards import SizeGuards

__all__ = ["Session", "load", "Output"]


class Output(dict):
    """A model output without transformers: keys in order, `out.logits`, `out["logits"]`, `out[0]`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(v for v in self.values() if v is not None)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


class Session:
    """A loaded artifact; call it like the compiled model: `sess(input_ids, attention_mask=mask)`."""

    def __init__(self, path: str, *, threads: int | None = None):
        self.path = path
        self.manifest = verify(path)
        self._threads = threads
        self._generator = None
        if self.manifest.get("kind", "onnx") != "onnx":
            raise ArtifactError(f"{path} holds an AOTInductor package ({PACKAGE}), which Session (ONNX Runtime) does "
                                f"not run: load it with torch._inductor.aoti_load_package('{path}/{PACKAGE}'), "
                                "inputs by position in the manifest's order")
        spec = self.manifest["inputs"]
        self._tensors = spec["tensors"]
        self._constants = spec["constants"]
        self._positional = spec["positional"]
        self._outputs = self.manifest["outputs"]
        self._guards = SizeGuards(self.manifest.get("guards"))
        routed = bool(self.manifest["session"]["routed"])
        try:
            self.session = ort.InferenceSession(os.path.join(path, OPT_MODEL), sess_options=_options(
                threads, routed, ort.GraphOptimizationLevel.ORT_DISABLE_ALL), providers=["CPUExecutionProvider"])
            self.source = OPT_MODEL
        except Exception:  # onnxruntime raises its own pybind types: fall back to the portable model
            try:
                self.session = ort.InferenceSession(os.path.join(path, MODEL), sess_options=_options(
                    threads, routed, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), providers=["CPUExecutionProvider"])
            except Exception as e:
                raise ArtifactError(f"ONNX Runtime {ort.__version__} cannot load {MODEL} of {path}: "
                                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                    ) from e
            self.source = MODEL
        names = [i.name for i in self.session.get_inputs()]
        if names != [t["name"] for t in self._tensors]:
            raise ArtifactError(f"{MODEL} of {path} takes inputs {names}; its manifest lists "
                                f"{[t['name'] for t in self._tensors]}")

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self._tensors]

    def __repr__(self) -> str:
        return f"routefx.runtime.Session({self.path!r}, inputs={self.input_names}, source={self.source!r})"

    # -- calling -------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        if len(args) > len(self._positional):
            raise InputError(f"the model takes at most {len(self._positional)} positional inputs "
                             f"({', '.join(self._positional)}), got {len(args)}")
        for name, value in zip(self._positional, args):
            if name in kwargs:
                raise InputError(f"input {name!r} given both by position and by keyword")
            kwargs[name] = value
        as_torch = any(_is_torch(v) for v in kwargs.values())
        feeds = self._feeds(kwargs)
        outs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))
        return self._rebuild(outs, as_torch)

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 seed: int | None = None):
        """Generate up to `max_new_tokens` tokens per row from an artifact exported with `generate=True`; returns
        [B, S + n] token ids (a torch tensor for torch inputs). Settings left None take the model's
        generation_config as exported (see `routefx/runtime/generate.py`)."""
        as_torch = _is_torch(input_ids)
        ids = input_ids.detach().cpu().numpy() if as_torch else input_ids
        mask = attention_mask.detach().cpu().numpy() if _is_torch(attention_mask) else attention_mask
        if self._generator is None:
            from routefx.runtime.generate import Generator
            self._generator = Generator(self.path, self.manifest, lambda routed: _options(
                self._threads, routed, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED))
        out = self._generator(ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              seed=seed)
        return _to_torch(out) if as_torch else out

    def _feeds(self, kwargs: dict) -> dict:
        names = {t["name"] for t in self._tensors}
        unknown = sorted(set(kwargs) - names - set(self._constants))
        if unknown:
            raise InputError(f"unexpected input(s) {unknown}; the model takes {sorted(names | set(self._constants))}")
        for k, v in self._constants.items():
            if k in kwargs and (not isinstance(kwargs[k], (bool, int, float, str, type(None))) or kwargs[k] != v):
                raise InputError(f"input {k!r} is {kwargs[k]!r}; the model was exported with {k}={v!r} baked in")
        feeds, sizes = {}, {}          # sizes: "B"/"S"/symbol -> (first input that fixed it, size)
        absent = [t for t in self._tensors if t["name"] not in kwargs]
        for t in absent:
            if t.get("absent") != "ones":
                raise InputError(f"missing input {t['name']!r}; the model takes {self.input_names}")
        for t in self._tensors:
            name = t["name"]
            if name not in kwargs:
                continue
            x = kwargs[name]
            if _is_torch(x):
                x = x.detach().cpu().contiguous().numpy()
            if not isinstance(x, np.ndarray):
                raise InputError(f"input {name!r} is a {type(x).__name__}; the model takes an array of dtype "
                                 f"{t['dtype']} and rank {len(t['shape'])}")
            if x.dtype.name != t["dtype"] and x.ndim == len(t["shape"]):
                x = _as_integral(name, x, t["dtype"], ids=t["vocab"] is not None)
            if x.dtype.name != t["dtype"] or x.ndim != len(t["shape"]):
                raise InputError(f"input {name!r} has dtype {x.dtype.name} and rank {x.ndim}; the model takes dtype "
                                 f"{t['dtype']} and rank {len(t['shape'])} (as in the example it was captured from)")
            _check_dims(t, x, sizes)
            if t["vocab"] is not None and x.size:
                _check_ids(name, x, t["vocab"])
            feeds[name] = np.ascontiguousarray(x)
        for t in absent:               # an optional mask left out: every token attended, as the model defines it
            if not all(d in sizes for d in t["shape"]):
                raise InputError(f"missing input {t['name']!r}: its shape {t['shape']} is not set by the inputs "
                                 f"given; the model takes {self.input_names}")
            feeds[t["name"]] = np.ones([sizes[d][1] for d in t["shape"]], dtype=t["dtype"])
        self._guards.require({**feeds, **self._constants}, "graph", "Compile the model in process (routefx captures "
                             "again for such sizes), or export from inputs of these sizes")
        return {t["name"]: feeds[t["name"]] for t in self._tensors}

    def _rebuild(self, outs: dict, as_torch: bool):
        convert = _to_torch if as_torch else (lambda a: a)
        leaves = [convert(outs[leaf["onnx"]]) if "onnx" in leaf else leaf["const"]
                  for leaf in self._outputs["leaves"]]
        return _build(self._outputs["tree"], leaves)


def _as_integral(name: str, x: np.ndarray, dtype: str, ids: bool) -> np.ndarray:
    """`x` cast to the integer or bool input dtype `dtype` where that loses nothing (int32 ids for int64, a bool or
    0/1 float mask; token ids never from floats), as the in-process compiled model takes them; else `x`
    unchanged (the caller refuses it)."""
    want = np.dtype(dtype)
    if want.kind not in "biu" or x.dtype.kind not in ("biu" if ids else "biuf"):
        return x
    if x.dtype.kind == "f" and x.size and not (np.isfinite(x).all() and (x == np.round(x)).all()):
        return x
    if x.size and want.kind == "b" and not np.isin(x, (0, 1)).all():
        return x
    if x.size and want.kind in "iu":
        info, lo, hi = np.iinfo(want), x.min(), x.max()
        if lo < info.min or hi > info.max:
            raise InputError(f"input {name!r} has values in [{lo}, {hi}], outside the range of {dtype}, the dtype "
                             "the model takes")
    return x.astype(want)


def _check_dims(t: dict, x: np.ndarray, sizes: dict) -> None:
    name = t["name"]
    for i, (want, got) in enumerate(zip(t["shape"], x.shape)):
        if isinstance(want, int):
            if got != want:
                raise InputError(f"input {name!r} has size {got} in dim {i}; the model takes {want} there "
                                 f"(shape {list(x.shape)})")
            continue
        if want in sizes and sizes[want][1] != got:
            what = "batch size" if want == "B" else "sequence length" if want == "S" else f"dim {want}"
            raise InputError(f"input {name!r} has shape {list(x.shape)}: its {what} {got} disagrees with "
                             f"{sizes[want][0]!r} ({sizes[want][1]})")
        sizes.setdefault(want, (name, got))
        if got == 0:
            what = "batch" if want == "B" else "sequence" if want == "S" else f"dim {i}"
            raise InputError(f"input {name!r} has shape {list(x.shape)}: an empty {what}; routefx runs at least "
                             "one token")


def _check_ids(name: str, x: np.ndarray, vocab: int) -> None:
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        where = [int(i) for i in np.argwhere(x == bad)[0]]
        raise InputError(f"input {name!r} holds token id {bad} at position {where}; the model's embedding takes "
                         f"ids in [0, {vocab})")


def _to_torch(a: np.ndarray):
    return sys.modules["torch"].from_numpy(a)     # torch is imported: the caller passed torch tensors


def _model_output_class(ref: str | None):
    """The ModelOutput class named `module:Name`, only where its module is already imported (no import here)."""
    if not ref:
        return None
    module, _, qualname = ref.partition(":")
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, dict) else None


def _build(node: dict, leaves: list):
    if "leaf" in node:
        return leaves[node["leaf"]]
    children = [_build(c, leaves) for c in node["children"]]
    if node["type"] == "tuple":
        return tuple(children)
    if node["type"] == "list":
        return list(children)
    fields = dict(zip(node["keys"], children))
    cls = _model_output_class(node.get("class"))
    if cls is not None and all(_is_torch(v) or v is None for v in fields.values()):
        return cls(**fields)
    return Output(fields)


def _options(threads: int | None, routed: bool, level) -> ort.SessionOptions:
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = level
    so.enable_mem_pattern = not routed
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")   # see routefx.backends.onnx's docstring
    return so


def load(path: str, *, threads: int | None = None) -> Session:
    """Verify and open the artifact at `path` (see `Session`)."""
    return Session(path, threads=threads)
