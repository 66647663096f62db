"""ONNX backend: lower the rewritten graph to ONNX and run it on ONNX Runtime (CPU).

`prepare(gm, example_kwargs)` lowers `gm` with its batch and sequence dims dynamic (the symbolic dims of the
placeholders' fake values) from the graph itself (`routefx.backends.onnx_program`: the captured graph lifted into an
ExportedProgram and translated by torch's ONNX exporter, with no trace; the exporter's decomposition where an op
lacks an ONNX implementation; `torch.onnx.export(gm)` only if both fail), lowers `routefx::routed_ffn` with
`routefx.backends.onnx_ops` (one TopK sort of the route ids per layer, per-route Gather/MatMul on pre-sliced,
pre-transposed weight initializers, one Gather back into token order; constant route ids: plain MatMuls on their
range), folds the weight slices, runs the onnxscript optimizer and opens an `onnxruntime.InferenceSession` with
the weights handed over in memory (`routefx.backends.onnx_session`: the graph is serialized without them).
Complex-valued subgraphs (DeepSeek-V2's and Llama 4's complex rotary embeddings), which the exporter cannot lower,
are first computed on (real, imaginary) pairs (`routefx.backends.complex_to_real`, on a copy of the graph).
Non-tensor keywords (use_cache=False) are baked into the model; its inputs are the model's own tensor inputs, its
weights are initializers. `runner.timings` has the wall seconds of each phase (export, fold, optimize, fuse, serialize,
session), `runner.cpu_timings` their CPU seconds, `runner.fusions` the fused-kernel rewrites made, and
`runner.export_path` says how the graph was lowered ("direct", "decomposed" or "traced").

The returned `OnnxRunner` is called like `gm(**kwargs)` and returns the same output structure (rebuilt with the
graph's output pytree spec: a Hugging Face ModelOutput, a tuple, a bare tensor); outputs that are None in the
eager result are None here. It checks every input's dtype and rank (and static dims) first and raises
`InputError` naming the input. For loops that feed outputs back as inputs (a generation loop's KV cache),
`run_arrays` runs the session on numpy arrays with the least per-call work and `run_ortvalues` through IO binding
(OrtValues). `runner.onnx_model` gives the serialized model (bytes, made on first use), or `runner.onnx_path` a file
in a temporary directory when the weights exceed protobuf's 2 GiB limit; `runner.save(path, external_data=True)`
writes the graph and one weight file.

Session options, chosen deliberately (see `session_options`):
- CPU execution provider only.
- intra_op_num_threads = torch.get_num_threads() at prepare time: the same core budget as the eager backend,
  so measured speedups compare like with like. inter_op_num_threads = 1 with ORT_SEQUENTIAL execution: the
  per-route branches are small, and a parallel executor would compete with the intra-op pool for the cores.
- The intra-op threads spin-wait between kernels during a run and stop when the run returns
  (`session.force_spinning_stop`). ONNX Runtime's default keeps them spinning after the run, on the cores that
  whatever runs next needs: measured on 2 cores (AMD EPYC, MatMul chains, 2 threads each), a 50 ms session took
  80 ms right after another session's run and an 80 ms chain of torch MatMuls took 115 ms right after a session's
  run; with the spinning stopped at the end of each run, 51 and 83 ms. That is every routefx model called next
  to another (a dense and a routed model, speculative decoding's draft and full model, the decode pieces of
  layer skipping) and every torch op between calls (a generation loop's sampling and cache updates).
- graph_optimization_level = ORT_ENABLE_ALL (ORT's default): constant folding, CSE, MatMul+Add -> Gemm,
  Gelu / QuickGelu / LayerNorm / RMSNorm fusions, all exact formulas (ORT's optional Gelu *approximation* is
  not enabled). ALL adds layout (NCHWc) transforms to EXTENDED, which only concern convolutions.
  `prepare(..., optimization_level="disable")` runs the graph as emitted.
- Export at opset 23 where ORT runs its fused `Attention` (probed once, `routefx.backends.onnx_opset`): one
  Attention node per layer instead of MatMul / Softmax / MatMul and a NaN guard over the probabilities.
- Before the session, `routefx.backends.onnx_fusions` rewrites the graph to ORT's fused CPU kernels: K/V fed
  to Attention without the exporter's head-repeat copies, RotaryEmbedding, SimplifiedLayerNormalization and
  SkipSimplifiedLayerNormalization (residual add + RMSNorm); ORT's own optimizer does not find the exporter's
  RMSNorm form (Pow / ReduceMean / Sqrt / Reciprocal). Measured with bench/onnx_fusions.py: together they cut by 40%
  the kernel time outside MatMul and Attention. Causal self-attention runs on com.microsoft
  GroupQueryAttention, which computes only the lower triangle of the scores (opset 23's Attention CPU kernel
  computes all S x S under the mask: 2x the time at S = 512), behind a run-time check that the mask is the causal
  one; a padded batch, a sliding window or a cached step runs the exported Attention (`onnx_attention`).
- Weight pre-packing stays on (ORT's default): MLAS packs constant MatMul operands once at session creation,
  one more reason every routed weight slice is its own initializer.
- enable_mem_pattern only for graphs without data-dependent shapes: a memory pattern is planned per input
  shape, but a routed graph's per-route row counts change from call to call at the same input shape.
- CPU memory arena on (default); log_severity_level = 3 (errors only: warnings about initializers the
  optimizer removed are expected); profiling only when asked (`profile=True`; the JSON goes to a temporary
  directory that lives as long as the runner).

The session reads the weights from the memory they live in (no copy): the model's own parameters where the
graph uses them unchanged, new arrays for folded slices. ONNX Runtime pre-packs MatMul weights into its own
buffers at session creation, so edit a model's weights before compiling it, not after: an in-place edit would
reach the weights that are not pre-packed (embeddings, norms) and not the others. Outputs are CPU tensors.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import fx
from torch.export import Dim
from torch.utils import _pytree as pytree

import routefx.ir.ops  # noqa: F401  (registers torch.ops.routefx.routed_ffn, used below)
from routefx.backends import onnx_program, onnx_session
from routefx.backends.complex_to_real import complex_to_real
from routefx.backends.onnx_fusions import DEFAULT_FUSIONS, fuse_, optimize_
from routefx.backends.onnx_aten_extra import aten_extra_lowerings
from routefx.backends.onnx_scatter import scatter_lowerings
from routefx.backends.onnx_grouped_mm import grouped_mm_lowerings
from routefx.backends.onnx_ops import drop_split_counts, fold_weight_slices, routed_ffn_lowering
from routefx.backends.onnx_masks import expand_attention_masks
from routefx.backends.onnx_opset import export_opset
from routefx.backends.static_routes import constant_route
from routefx.errors import BackendError, InputError
from routefx.ir import graph_utils as gu
from routefx.ir.tracing import tracing

__all__ = ["prepare", "OnnxRunner", "session_options"]

_ROUTED_FFN = torch.ops.routefx.routed_ffn.default
_MAX_PROTO_BYTES = 1_800_000_000  # below protobuf's 2 GiB limit for one serialized model
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_DTYPES = {
    "tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16, "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}

_NO_SPINNING = ("session.intra_op.allow_spinning", "0")   # session config entry: threads never spin
_STOP_SPINNING = ("session.force_spinning_stop", "1")      # threads spin during a run only (module docstring)


def _numpy_dtype(dtype: torch.dtype | None) -> np.dtype | None:
    """numpy's dtype for a torch dtype; None where numpy has none (bfloat16) or the input type is unknown."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype if dtype is not None else None
    except TypeError:
        return None


def session_options(*, optimization_level: str = "all", routed: bool = False, profile_dir: str | None = None,
                    spinning: bool = True) -> ort.SessionOptions:
    """The session options documented in the module docstring. `spinning=False`: the intra-op threads never
    spin-wait, not even during a run; for many small sessions run one after another (the decode pieces: measured on
    the CPU benchmark model, their decode ran 91 / 333 tokens/s at batch 1 / 8 so, against 83 / 295 with spinning
    stopped at the end of each run)."""
    if optimization_level not in _LEVELS:
        raise BackendError(f"unknown optimization_level {optimization_level!r}; supported: {', '.join(_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _LEVELS[optimization_level]
    so.enable_mem_pattern = not routed
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3
    so.add_session_config_entry(*_STOP_SPINNING)
    if not spinning:
        so.add_session_config_entry(*_NO_SPINNING)
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, "ort_profile")
    return so


@dataclasses.dataclass(frozen=True)
class _Input:
    name: str
    dtype: torch.dtype
    shape: tuple  # ints for static dims, str / None for dynamic ones


class OnnxRunner:
    """Runs the exported model on ONNX Runtime; called like the graph module (`run(**kwargs)`)."""

    def __init__(self, session: ort.InferenceSession, *, arg_names: tuple[str, ...], constants: dict[str, Any],
                 leaves: list, out_spec, model: ir.Model, graph: onnx_session.Graph, tmpdir=None,
                 timings: dict | None = None, export_path: str | None = None):
        self.session = session
        self._model = model  # the optimized onnx_ir model; its weights are the ones the session reads
        self._graph = graph
        self._onnx_bytes: bytes | None = None
        self._onnx_path: str | None = None
        self.timings = dict(timings or {})  # wall seconds per prepare phase: export, fold, optimize, fuse, ...
        self.cpu_timings: dict = {}  # CPU seconds (process, all threads) of the same phases
        self.fusions: dict = {}  # rewrites to ONNX Runtime's fused kernels: name -> count (onnx_fusions)
        self.notes: list[str] = []  # what compile()'s report says about the lowering
        self.export_path = export_path  # how the graph became ONNX: "direct", "decomposed" or "traced"
        self._tmpdir = tmpdir  # keeps a temporary directory (large model, profiles) alive with the runner
        self._arg_names = arg_names
        self._constants = constants
        self._leaves = leaves  # per flat output: True for an ONNX output, else the constant leaf itself
        self._out_spec = out_spec
        self.inputs = tuple(_Input(i.name, _ORT_DTYPES.get(i.type), tuple(i.shape)) for i in session.get_inputs())
        self.output_names = tuple(o.name for o in session.get_outputs())
        self._array_specs = tuple((i.name, _numpy_dtype(i.dtype), len(i.shape)) for i in self.inputs)
        # run_arrays works: numpy dtypes (no bf16), and every output of the graph is an ONNX output
        self.takes_arrays = all(d is not None for _, d, _ in self._array_specs) and all(x is True for x in leaves)

    def __call__(self, *args, **kwargs):
        if len(args) > len(self._arg_names):
            raise InputError(f"the ONNX model takes at most {len(self._arg_names)} positional inputs "
                             f"({', '.join(self._arg_names)}), got {len(args)}")
        for name, value in zip(self._arg_names, args):
            if name in kwargs:
                raise InputError(f"input {name!r} given both by position and by keyword")
            kwargs[name] = value
        feeds = self._feeds(kwargs)
        outs = iter(self.session.run(None, feeds))
        flat = [torch.from_numpy(next(outs)) if leaf is True else leaf for leaf in self._leaves]
        if self._out_spec is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        return pytree.tree_unflatten(flat, self._out_spec)

    def run_ortvalues(self, **kwargs) -> list:
        """One run through ONNX Runtime IO binding, for loops that feed outputs back as inputs (generation's KV
        cache). Each input is a torch tensor (checked as in `__call__`) or an `onnxruntime.OrtValue` returned by an
        earlier run (bound as it is: no numpy or torch round trip). Returns every ONNX output as a CPU OrtValue
        that ONNX Runtime allocated, in `output_names` order; `torch.from_numpy(v.numpy())` views one without a
        copy. A fresh binding per run: a binding's outputs from one run are the next run's pre-allocated buffers,
        which fails when an output grows (a cache) and would overwrite a value the caller still holds."""
        feeds = self._feeds(kwargs, keep_ortvalues=True)
        binding = self.session.io_binding()
        values = [v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for v in feeds.values()]
        for name, v in zip(feeds, values):     # `values` keeps the numpy arrays the OrtValues view alive
            binding.bind_ortvalue_input(name, v)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def run_arrays(self, feeds: dict) -> list:
        """The session run on numpy arrays by input name, with the least per-call work: every input given (by
        its ONNX name), each checked for dtype and rank only, outputs returned as ONNX Runtime gives them (numpy
        arrays, in `output_names` order; no output structure, no torch). Only where `takes_arrays` (numpy dtypes,
        and every output of the graph an ONNX output, so that the arrays are the graph's flat outputs). For loops
        that feed outputs back as inputs (generation's KV cache): ONNX Runtime reads contiguous arrays in place and
        returns arrays over its own output buffers (onnxruntime 1.32: their base is ONNX Runtime's), so the cache
        is not copied between steps."""
        if len(feeds) != len(self.inputs):
            raise InputError(f"run_arrays takes every input: got {sorted(feeds)}; the ONNX model takes "
                             f"{[i.name for i in self.inputs]}")
        if not self.takes_arrays:
            raise BackendError(f"run_arrays needs numpy dtypes; the ONNX model takes "
                               f"{[str(i.dtype) for i in self.inputs]}: call the runner instead")
        for name, dtype, rank in self._array_specs:
            a = feeds.get(name)
            if a is None or a.dtype != dtype or a.ndim != rank:
                raise InputError(f"input {name!r} is {'missing' if a is None else f'{a.dtype} of rank {a.ndim}'}; "
                                 f"the ONNX model takes {dtype} of rank {rank}")
        return self.session.run(None, feeds)

    def _feeds(self, kwargs: dict, keep_ortvalues: bool = False) -> dict:
        expected = {i.name for i in self.inputs} | set(self._constants)
        unknown = sorted(set(kwargs) - expected)
        if unknown:
            raise InputError(f"unexpected input(s) {unknown}; the ONNX model takes {sorted(expected)}")
        for name, const in self._constants.items():
            if name in kwargs and kwargs[name] is not const and (isinstance(kwargs[name], torch.Tensor)
                                                                 or kwargs[name] != const):
                raise InputError(f"input {name!r} is {kwargs[name]!r}; the ONNX model was exported with {name}="
                                 f"{const!r} baked in")
        feeds = {}
        for spec in self.inputs:
            if spec.name not in kwargs:
                raise InputError(f"missing input {spec.name!r}; the ONNX model takes {[i.name for i in self.inputs]}")
            x = kwargs[spec.name]
            if keep_ortvalues and isinstance(x, ort.OrtValue):
                if _ORT_DTYPES.get(x.data_type()) != spec.dtype or len(x.shape()) != len(spec.shape):
                    raise InputError(f"input {spec.name!r} is an OrtValue of type {x.data_type()} and rank "
                                     f"{len(x.shape())}; the ONNX model takes dtype {spec.dtype} and rank "
                                     f"{len(spec.shape)}")
                feeds[spec.name] = x
                continue
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {spec.name!r} is a {type(x).__name__}; the ONNX model takes a tensor of "
                                 f"dtype {spec.dtype} and rank {len(spec.shape)}")
            if x.dtype != spec.dtype or x.dim() != len(spec.shape):
                raise InputError(f"input {spec.name!r} has dtype {x.dtype} and rank {x.dim()}; the ONNX model "
                                 f"takes dtype {spec.dtype} and rank {len(spec.shape)}")
            if any(isinstance(e, int) and e != g for e, g in zip(spec.shape, x.shape)):
                shown = ", ".join(str(e) if isinstance(e, int) else "?" for e in spec.shape)
                raise InputError(f"input {spec.name!r} has shape {list(x.shape)}; the ONNX model takes shape "
                                 f"[{shown}] (? = any size)")
            feeds[spec.name] = x.detach().cpu().contiguous().numpy()
        return feeds

    def at_level(self, optimization_level: str) -> "OnnxRunner":
        """The same exported model in a new session at another ORT graph optimization level (no re-export):
        tests run both "all" and "disable", so that no fusion hides a wrong lowering."""
        return self._reopened(session_options(optimization_level=optimization_level,
                                              routed=not self.session.get_session_options().enable_mem_pattern))

    def _reopened(self, so: ort.SessionOptions) -> "OnnxRunner":
        other = copy.copy(self)
        other.session = self._graph.session(so)
        return other

    @property
    def onnx_model(self) -> bytes | None:
        """The serialized model, weights inline (made on first use); None above protobuf's 2 GiB limit (then
        see `onnx_path`)."""
        if self._onnx_bytes is None and _initializer_bytes(self._model) < _MAX_PROTO_BYTES:
            self._onnx_bytes = onnx_session.serialize(self._model)
        return self._onnx_bytes

    @onnx_model.setter
    def onnx_model(self, value: bytes | None) -> None:  # None drops the cached bytes
        self._onnx_bytes = value

    @property
    def onnx_path(self) -> str | None:
        """For a model above protobuf's limit: the model written with external data into a temporary directory
        that lives as long as the runner (made on first use); None otherwise."""
        if self._onnx_path is None and _initializer_bytes(self._model) >= _MAX_PROTO_BYTES:
            self._tmpdir = self._tmpdir or tempfile.TemporaryDirectory(prefix="routefx_onnx_")
            self._onnx_path = os.path.join(self._tmpdir.name, "model.onnx")
            ir.save(self._model, self._onnx_path, external_data="model.onnx.data")
        return self._onnx_path

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (the runner was prepared with `profile=True`); returns the JSON's path."""
        return self.session.end_profiling()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's initializers (what a saved model stores; nested routes share theirs)."""
        return _initializer_bytes(self._model)

    def save(self, path: str, *, external_data: bool = False) -> None:
        """Write the ONNX model to `path`: one file (below protobuf's 2 GiB limit; a large model already lives at
        `onnx_path`), or with `external_data=True` the graph at `path` and the weights in `path + ".data"`."""
        if external_data:
            ir.save(self._model, path, external_data=os.path.basename(path) + ".data")
            return
        if self.onnx_model is None:
            raise BackendError(f"this model is stored with external data at {self.onnx_path}; copy that directory")
        with open(path, "wb") as f:
            f.write(self.onnx_model)


_DTYPES = (torch.float32, torch.float16)


def _check_float_dtypes(gm: fx.GraphModule) -> None:
    """`BackendError` for weights of a floating dtype the onnx backend does not run: bfloat16 (ONNX Runtime's CPU
    provider has no bfloat16 MatMul) and float64 (its fused CPU kernels take float32 / float16 only, and without
    them ORT 1.30's own optimizer still fuses a double SiLU into a float-only kernel, and its double attention
    gave NaN on a padded batch)."""
    found = {t.dtype for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()} - set(_DTYPES)
    if found:
        name = str(sorted(found, key=str)[0]).removeprefix("torch.")
        why = "ONNX Runtime's CPU provider has no bfloat16 MatMul" if "bfloat16" in name else \
            "ONNX Runtime's fused CPU kernels take float32 and float16 only"
        raise BackendError(f"the model has {name} weights; {why} (the onnx backend runs float32 and float16 "
                           "models): convert the model (model.float()) or use backend='eager' or 'inductor'")


def prepare(gm: fx.GraphModule, example_kwargs: dict, *, optimization_level: str = "all",
            profile: bool = False, direct: bool = True, fusions=DEFAULT_FUSIONS, spinning: bool = True) -> OnnxRunner:
    """Export `gm` to ONNX and open an ONNX Runtime CPU session; returns the runner (see the module docstring).

    `example_kwargs` are the inputs `gm` was captured from (tensors and constants, by keyword).
    `optimization_level` is ORT's graph optimization level ("disable", "basic", "extended", "all");
    `profile=True` turns ORT's profiler on (`runner.end_profiling()` returns the JSON's path). `direct=False`
    skips the trace-free translation (`onnx_program`; tests compare both paths). `fusions` names the rewrites to
    ONNX Runtime's fused kernels (`routefx.backends.onnx_fusions.FUSIONS`; () for none). Raises
    `BackendError` naming the node when the export fails.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n.target for n in placeholders if n.target not in example_kwargs]
    if missing:
        raise BackendError(f"example_kwargs lack {missing}; the graph takes {[n.target for n in placeholders]}")
    gm, complex_rewrites = complex_to_real(gm)   # complex values (rotary embeddings) as (re, im) pairs: a copy
    gm, _ = expand_attention_masks(gm)           # masks broadcast over the keys, as ONNX Attention needs: a copy
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    _check_float_dtypes(gm)
    arg_names = _positional_names(gm, [n.target for n in placeholders])
    clock = _Clock()
    with tracing():
        model, path = _export(gm, placeholders, arg_names, example_kwargs, direct=direct)
    clock.lap("export")
    drop_split_counts(model)
    fold_weight_slices(model)
    clock.lap("fold")
    optimizer = optimize_(model)  # onnxscript's optimizer (what torch.onnx.export(optimize=True) runs), less its
    clock.lap("optimize")         # quadratic rule
    fused = fuse_(model, fusions)
    clock.lap("fuse")

    tensor_inputs = [n.target for n in placeholders if isinstance(example_kwargs[n.target], torch.Tensor)]
    if [v.name for v in model.graph.inputs] != tensor_inputs:
        raise BackendError(f"the ONNX model's inputs {[v.name for v in model.graph.inputs]} differ from the "
                           f"graph's tensor inputs {tensor_inputs}")
    leaves, out_spec = _output_leaves(gm)
    if sum(leaf is True for leaf in leaves) != len(model.graph.outputs):
        raise BackendError(f"the ONNX model has {len(model.graph.outputs)} outputs; the graph has "
                           f"{sum(leaf is True for leaf in leaves)} tensor outputs")

    tmpdir = tempfile.TemporaryDirectory(prefix="routefx_onnx_") if profile else None
    routed = any(node.op_type == "TopK" for node in ir.traversal.RecursiveGraphIterator(model.graph))
    so = session_options(optimization_level=optimization_level, routed=routed,
                         profile_dir=tmpdir.name if tmpdir else None, spinning=spinning)
    graph = onnx_session.prepare_graph(model)  # weights handed over in memory, never serialized
    clock.lap("serialize")
    try:
        session = graph.session(so)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise BackendError(f"ONNX Runtime could not load the exported model: {type(e).__name__}: "
                           f"{onnx_program.first_line(e)}") from e
    clock.lap("session")
    constants = {k: v for k, v in example_kwargs.items() if not isinstance(v, torch.Tensor)}
    run = OnnxRunner(session, arg_names=arg_names, constants=constants, leaves=leaves, out_spec=out_spec,
                     model=model, graph=graph, tmpdir=tmpdir, timings=clock.wall, export_path=path)
    run.cpu_timings = clock.cpu
    run.fusions = dict(fused.counts)
    run.notes = fused.summary() + ([f"ONNX optimizer: {optimizer}"] if optimizer != "routefx" else [])
    if complex_rewrites:
        run.notes.append(f"complex_to_real: {complex_rewrites} complex-valued nodes computed on (re, im) pairs")
    return run


class _Clock:
    """Wall and CPU seconds (this process, all threads) of consecutive phases."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = round(t - self._t, 3), round(c - self._c, 3)
        self._t, self._c = t, c


# ---- export helpers ----------------------------------------------------------------------------------------

def _moe_left_captured(gm: fx.GraphModule, errors: str) -> str:
    """Where the export failed on a grouped GEMM or in a module that runs one (as `errors` say): that the block is
    a MoE block raise_moe left as captured; else ''."""
    grouped = [n for n in gm.graph.nodes if gu.is_grouped_mm(n)]
    paths = sorted({next(reversed(n.meta.get("nn_module_stack", {}).values()), (n.name,))[0] for n in grouped})
    if not grouped or not ("grouped_mm" in errors or any(p in errors for p in paths)):
        return ""
    return (f"the graph runs MoE experts through a grouped GEMM ({grouped[0].target}, in {paths}): MoE blocks that "
            "raise_moe left as captured (the compile report's raise_moe misses say why, or its raise_ffn misses for "
            "a block not read as an FFN at all); the onnx backend lowers their grouped GEMMs but not every op of "
            "such a block, backend 'eager' runs the captured blocks. ")


def _export(gm: fx.GraphModule, placeholders: list[fx.Node], arg_names: tuple[str, ...],
            example_kwargs: dict, *, direct: bool = True) -> tuple[ir.Model, str]:
    """The graph as an ONNX model (not optimized), lowered from the graph itself (`onnx_program`: no trace, or
    one re-trace where an op needs decomposing); falls back to `torch.onnx.export(gm)` (a fresh torch.export of
    `gm`) if that fails. Returns the model and the path that made it."""
    routed = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _ROUTED_FFN]
    static = {n.name: r for n in routed if (r := constant_route(n.args[1])) is not None}
    names = [n.name for n in routed]
    tensor_inputs = [n.target for n in placeholders if isinstance(example_kwargs[n.target], torch.Tensor)]
    opsets = [export_opset(), None] if export_opset() is not None else [None]
    errors = []

    def lowerings(ep):  # routed_ffn nodes keep their fx names in the program
        return {**grouped_mm_lowerings(), **aten_extra_lowerings(), **scatter_lowerings(),
                _ROUTED_FFN: routed_ffn_lowering([n.name for n in ep.graph.nodes if n.target is _ROUTED_FFN], static)}

    for opset in opsets:  # opset 23 (fused Attention) where ORT runs it; the default opset if that export fails
        with onnx_program.export_context():
            try:
                return onnx_program.to_onnx(gm, tensor_inputs, opset=opset, lowerings=lowerings,
                                            allow_direct=direct)
            except Exception as e:  # noqa: BLE001 - the exporter raises many types
                if onnx_program.routefx_error(e) is not None:  # a routefx lowering refused: tracing again cannot help
                    raise BackendError(f"ONNX export failed: {onnx_program.describe_export_error(e)}") from e
                errors.append(e)
            try:  # torch.export of gm itself, then the exporter's decomposition and translation
                return _export_traced(gm, placeholders, arg_names, example_kwargs, opset, names, static), "traced"
            except Exception as e:  # one typed error naming the node
                if opset is opsets[-1]:
                    why = (f"{onnx_program.describe_export_error(e)} (lowered from the captured graph: "
                           f"{onnx_program.describe_export_error(errors[0])})")
                    raise BackendError(f"ONNX export failed: {_moe_left_captured(gm, why)}{why}") from e


def _export_traced(gm, placeholders, arg_names, example_kwargs, opset, names, static) -> ir.Model:
    """torch.onnx.export of `gm` itself (torch.export traces it again), the placeholders' symbolic dims dynamic."""
    call_args = tuple(_widen(n, example_kwargs[n.target]) for n in placeholders if n.target in arg_names)
    call_kwargs = {n.target: _widen(n, example_kwargs[n.target]) for n in placeholders
                   if n.target not in arg_names}
    dyn = {n.target: _dynamic_dims(n) for n in placeholders}
    dynamic_shapes = tuple(dyn[a] for a in arg_names) if not call_kwargs else dyn
    program = torch.onnx.export(gm, call_args, kwargs=call_kwargs or None, dynamo=True,
                                dynamic_shapes=dynamic_shapes, optimize=False, verbose=False,
                                opset_version=opset, custom_translation_table={
                                    **grouped_mm_lowerings(), **aten_extra_lowerings(), **scatter_lowerings(),
                                    _ROUTED_FFN: routed_ffn_lowering(names, static)})
    return program.model


def _positional_names(gm: fx.GraphModule, names: list[str]) -> tuple[str, ...]:
    """Inputs `gm` was captured with as positional arguments (its in_spec's args), in order."""
    info = gm.meta.get("routefx")
    if info is not None:
        return tuple(info.arg_names)
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return ()
    n_args = spec.children_specs[0].num_children
    return tuple(names[:n_args])


def _dynamic_dims(node: fx.Node):
    """Dim.AUTO for every symbolic dim of the placeholder's fake value; None for constants and static shapes."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dims = {i: Dim.AUTO for i, s in enumerate(val.shape) if not isinstance(s, int)}
    return dims or None


def _widen(node: fx.Node, value):
    """The example as export needs it: contiguous (a strided view would put symbolic strides into the graph)
    and with size-1 dynamic dims repeated to 2 (torch.export would specialise them to the constant 1)."""
    val = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().contiguous()
    if not isinstance(val, torch.Tensor) or value.dim() != val.dim():
        return value
    for i, s in enumerate(val.shape):
        if not isinstance(s, int) and value.shape[i] == 1:
            value = torch.cat([value, value], dim=i)
    return value


def _output_leaves(gm: fx.GraphModule) -> tuple[list, Any]:
    """Per flat output of `gm`: True where the ONNX model has an output, else the constant leaf (None, int)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    if not isinstance(flat, (tuple, list)):
        flat = (flat,)
    leaves = [True if isinstance(a, fx.Node) else a for a in flat]
    return leaves, getattr(gm, "_out_spec", None)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
