"""Decoding with layers skipped per step and per row: the decode graph's pieces (`split`) driven by a decode policy
(`decode_policies`).

Per decode step, the policy gives a run mask [B, L]. Layer l then runs on the rows that run it (the whole batch
without a copy when all do; the rows gathered along the batch dim when some do) and its K/V-only piece runs on the
other rows, so a skipped layer's attention, output projection and FFN matmuls are never executed. Rows are merged
back with `index_copy`. A layer no row runs costs its K/V projections only.

The prompt runs every layer: through the monolithic prefill graph, or, for policies that measure the prompt
(ActivationSkip), through the same pieces with an empty past, the logits computed for the last position only.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from routefx.calibrate.data import token_mask
from routefx.calibrate.search import bisect_decreasing
from routefx.errors import CalibrationError, CaptureError, PolicyError, UnsupportedModelError
from routefx.generate.arrays import as_array, as_torch
from routefx.generate.decode_policies import ActivationSkip, DecodePolicy
from routefx.generate.graphs import generation_graphs
from routefx.generate.split import Pieces, split_decode
from routefx.generate.step import cache_entries, entry_shape, prompt_positions
from routefx.ir.tracing import tracing

__all__ = ["SkipStepper", "SkipCounts", "decode_pieces", "fit_threshold", "prompt_changes"]


def _example(g, B: int, S: int, P: int, device) -> dict:
    """Decode inputs for lowering the pieces: batch B, S new tokens, P past positions, on the model's device."""
    gen = torch.Generator().manual_seed(0)
    ex = {"input_ids": torch.arange(B * S).reshape(B, S) + 1, "attention_mask": torch.ones(B, P + S, dtype=torch.long),
          "position_ids": torch.arange(P, P + S).expand(B, S).contiguous()}
    ex.update(_past(g, B, P, lambda shape, dtype: torch.randn(shape, generator=gen).to(dtype)))
    return {k: v.to(device) for k, v in ex.items()}


def _past(g, B: int, P: int, make) -> dict:
    """Every cache entry of the decode graph (K/V, indexer keys) for B rows and P past positions, made by
    `make(shape, dtype)`."""
    return {f"past_{name}": make(*entry_shape(g.layout, i, name, slot, B, P))
            for i, name, slot in cache_entries(g.layout, g.kept)}


def _entries(g) -> list[tuple[str, ...]]:
    """Per kept layer, the names of its cache entries in the decode graph's order."""
    per: dict[int, list[str]] = {}
    for i, name, _ in cache_entries(g.layout, g.kept):
        per.setdefault(i, []).append(name)
    return [tuple(per[i]) for i in g.kept]


def decode_pieces(cm) -> Pieces:
    """The pieces of `cm`'s decode graph, lowered by its backend (made on first use, then kept on `cm`)."""
    cached = cm.__dict__.get("_decode_pieces")
    if cached is not None:
        return cached
    g = generation_graphs(cm)
    pieces = split_decode(g.decode.gm, g.decode.ir, g.kept, _entries(g))
    order = [pieces.pre, *[q for pair in zip(pieces.layers, pieces.kv) for q in pair], pieces.post]
    dev = next(iter(cm._model.parameters()), torch.empty(0)).device
    a, b = _example(g, 2, 3, 5, dev), _example(g, 4, 6, 7, dev)  # every size different between the two
    # 2L + 2 small sessions run one after another, with threads that never spin (see onnx.session_options; measured
    # on the CPU benchmark model with ONNX Runtime's default, spinning after a run: 7.7 decode tokens/s against 50
    # for the one-graph decode)
    quiet = {"spinning": False} if "spinning" in inspect.signature(cm._backend.prepare).parameters else {}
    with torch.no_grad():
        for env in (a, b):                # eager runs of the pieces: their example inputs at two sets of sizes
            for p in order:
                env.update(zip(p.outputs, p.gm(**{n: env[n] for n in p.inputs})))
        for p in order:
            example = {n: a[n] for n in p.inputs}
            varying = {n: [d for d in range(a[n].dim()) if a[n].shape[d] != b[n].shape[d]] for n in p.inputs}
            if _static_where_varying(p.gm, varying):
                p.gm = _reexport(p.gm, example, varying)
            p.run = cm._backend.prepare(p.gm, example, **quiet)
    pieces.batched = frozenset(n for n in a if isinstance(a[n], torch.Tensor) and a[n].dim() and
                               a[n].shape[0] == 2 and b[n].shape[0] == 4)
    cm.__dict__["_decode_pieces"] = pieces
    return pieces


_NO_CALIBRATION = ("ActivationSkip(budget=...) fits its threshold on the compile's calibration data, and this model "
                   "has none: compile with calibration=... or give threshold=...")


def _static_where_varying(gm, varying: dict) -> bool:
    """Whether a placeholder's recorded shape is static in a dim that varies (torch 2.11 records some values
    computed from position ids, rotary cos/sin, with the example's sizes)."""
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and any(isinstance(v.shape[d], int) for d in varying.get(n.target, [])):
            return True
    return False


def _reexport(gm, example: dict, varying: dict):
    """`gm` traced again by torch.export with the varying dims dynamic (fresh symbolic shapes for the backend)."""
    from torch.export import Dim

    from routefx.ir.capture import CaptureInfo, _drop_export_artifacts
    shapes = {n: ({d: Dim.AUTO for d in dims} or None) for n, dims in varying.items()}
    try:
        with tracing():
            ep = torch.export.export(gm, (), kwargs=example, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many types; one typed error
        raise CaptureError(f"could not re-trace a decode piece with dynamic shapes: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    new = ep.module()
    _drop_export_artifacts(new)
    new.meta["routefx"] = CaptureInfo(arg_names=(), constant_kwargs={})
    return new


def _rows(env: dict, names: list[str], batched: frozenset, idx: torch.Tensor | None) -> dict:
    if idx is None:
        return {n: env[n] for n in names}
    return {n: env[n].index_select(0, idx) if n in batched else env[n] for n in names}


@dataclasses.dataclass
class SkipCounts:
    layer_rows: list[int]        # per layer: rows that ran the whole layer (decode steps)
    kv_rows: list[int]           # per layer: rows that ran only its K/V projections
    layer_calls: list[int]       # per layer: decode steps that ran its layer piece (on some rows)
    kv_calls: list[int]          # per layer: decode steps that ran its K/V piece (on some rows)
    steps: int = 0

    @property
    def fraction(self) -> float:
        total = sum(self.layer_rows) + sum(self.kv_rows)
        return sum(self.layer_rows) / total if total else 1.0


class SkipStepper:
    """`Stepper`'s interface (prefill, decode, extend, mask, past) with a decode policy skipping layers."""

    def __init__(self, cm, mask, policy: DecodePolicy):
        if not isinstance(policy, DecodePolicy):
            raise PolicyError(f"decode_policy must be a routefx.generate DecodePolicy (DepthDecay, ActivationSkip, "
                              f"LayerSubset), got {type(policy).__name__}")
        fit = isinstance(policy, ActivationSkip) and policy.threshold is None
        if fit and cm._calibration is None:
            raise CalibrationError(_NO_CALIBRATION)
        self.g = generation_graphs(cm)
        self.g.layout.refuse_recurrent(cm._model, f"decode_policy={type(policy).__name__}", indexer_ok=True)
        self.p = decode_pieces(cm)
        L, B = len(self.p.layers), mask.shape[0]
        policy.check(L, B)
        if fit:
            policy = ActivationSkip(threshold=fit_threshold(cm, policy))
        self.policy, self.mask, self.L = policy, mask, L
        self.past: list[torch.Tensor] = []
        self.pos = None
        self.chosen = None
        self.changes = None
        self.counts = SkipCounts([0] * L, [0] * L, [0] * L, [0] * L)

    def _run(self, inputs: dict, run: torch.Tensor | None, changes: list | None = None) -> tuple[torch.Tensor, list]:
        """Pieces on one step's inputs; run: bool [B, L] (None: every layer). Returns (stream S_L, new past)."""
        p, env = self.p, dict(inputs)
        env.update(zip(p.pre.outputs, _call(p.pre, _rows(env, p.pre.inputs, p.batched, None))))
        B = inputs["input_ids"].shape[0]
        n_runs = [B] * self.L if run is None else run.sum(0).tolist()      # rows running each layer
        past = []
        for j in range(self.L):
            s_in, s_out = p.streams[j], p.streams[j + 1]
            n_run = n_runs[j]
            if n_run == B:
                outs = _call(p.layers[j], _rows(env, p.layers[j].inputs, p.batched, None))
            elif n_run == 0:
                outs = (env[s_in], *_call(p.kv[j], _rows(env, p.kv[j].inputs, p.batched, None)))
            else:
                dev = env[s_in].device                 # the run mask is host data; rows are on the model's device
                on, off = run[:, j].nonzero()[:, 0].to(dev), (~run[:, j]).nonzero()[:, 0].to(dev)
                a = _call(p.layers[j], _rows(env, p.layers[j].inputs, p.batched, on))
                b = (env[s_in].index_select(0, off), *_call(p.kv[j], _rows(env, p.kv[j].inputs, p.batched, off)))
                outs = [x.new_empty((B, *x.shape[1:])).index_copy_(0, on, x).index_copy_(0, off, y)
                        for x, y in zip(a, b)]
            if changes is not None:                # relative change of the stream per token: [B, S]
                changes.append((outs[0] - env[s_in]).float().norm(dim=-1) / env[s_in].float().norm(dim=-1)
                               .clamp_min(1e-12))
            if run is not None:
                c = self.counts
                c.layer_rows[j] += n_run
                c.kv_rows[j] += B - n_run
                c.layer_calls[j] += n_run > 0
                c.kv_calls[j] += n_run < B
            env[s_out] = outs[0]
            past += outs[1:]
        return env[p.streams[-1]], past

    @torch.no_grad()
    def prefill(self, ids):
        pos = prompt_positions(self.mask)
        if self.policy.needs_prefill_stats:
            logits, self.changes = self._measured_prefill(ids, pos)
        else:
            feeds = {"input_ids": ids, "attention_mask": self.mask, "position_ids": pos}
            out = self.g.prefill_for(feeds).run(**feeds)
            self.past, logits = list(out[1:]), out[0][:, -1]
        self.pos = pos[:, -1:]
        self.chosen = self.policy.at_prefill(self.L, ids.shape[0], self.changes)
        return logits

    def _measured_prefill(self, ids, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt through every piece (empty past; the LM head on the last position only). Keeps the cache;
        returns (last logits [B, V], the per-row, per-layer relative stream change averaged over the row's real
        tokens [B, L] float64)."""
        B, g = ids.shape[0], self.g
        inputs = {"input_ids": ids, "attention_mask": self.mask, "position_ids": pos,
                  **_past(g, B, 0, lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=ids.device))}
        self._within_guards(inputs)
        per_token: list[torch.Tensor] = []
        stream, self.past = self._run(inputs, None, per_token)
        post = self.p.post
        logits = _call(post, {post.inputs[0]: stream[:, -1:].contiguous()})[0][:, -1]
        real = self.mask.bool().double()                                         # [B, S]
        ch = torch.stack([c.double() for c in per_token], dim=-1)                # [B, S, L]
        return logits, (ch * real[..., None]).sum(1) / real.sum(1, keepdim=True)

    def _within_guards(self, inputs: dict) -> None:
        """The pieces are the first decode capture's, split per layer: run only on sizes that capture holds for (a
        model's code may branch on a length, e.g. attention over the top k keys once the past is longer)."""
        if (why := self.g.decode.outside(inputs)) is not None:
            sizes = {k: list(v.shape) for k, v in list(inputs.items())[:3]}
            raise UnsupportedModelError(
                f"decode_policy={type(self.policy).__name__} runs the pieces of the decode graph captured first, which "
                f"holds for other input sizes than {sizes} (torch.export's guard: {why.removeprefix('Guard failed: ')}"
                f"): the model's code branches on a length there. Generate without a decode policy (it captures "
                "again for such sizes), or with shorter sequences")

    def decode(self, new):
        return self.extend(new)[:, -1]

    @torch.no_grad()
    def extend(self, new):
        B, S = new.shape
        self.counts.steps += 1
        run = self.policy.run_mask(self.counts.steps, self.L, B, self.chosen)
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, S)], dim=1)
        pos = self.pos + torch.arange(1, S + 1, device=self.pos.device)
        inputs = {"input_ids": new, "attention_mask": self.mask, "position_ids": pos,
                  **dict(zip(self.g.past_names, self.past))}
        self._within_guards(inputs)
        stream, self.past = self._run(inputs, run)
        self.pos = pos[:, -1:]
        return _call(self.p.post, {self.p.post.inputs[0]: stream})[0]


def _call(piece, feeds: dict) -> tuple:
    """Run a piece; its outputs as a tuple of torch tensors. On ONNX Runtime through `run_arrays` (numpy arrays
    in and out, dtype and rank checks only): a step makes 2L + 2 such calls, and the plain call's per-call input
    checks and output rebuilding were measured at ~40 us each."""
    run = piece.run
    if getattr(run, "takes_arrays", False):
        return tuple(map(as_torch, run.run_arrays({n: as_array(v) for n, v in feeds.items()})))
    out = run(**feeds)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def prompt_changes(cm, batches: list[dict]) -> torch.Tensor:
    """Per-row, per-layer prompt stream changes of `batches` (dicts with input_ids, attention_mask): [N, L]."""
    out = []
    with torch.no_grad():
        for b in batches:
            mask = token_mask(b).long()
            st = SkipStepper(cm, mask, ActivationSkip(threshold=0.0))
            st.prefill(b["input_ids"])
            out.append(st.changes)
    return torch.cat(out)


def fit_threshold(cm, policy: ActivationSkip, tol: float = 0.02) -> float:
    """The threshold at which the fraction of (row, layer) pairs run on the compile's calibration data is
    `policy.budget` (within `tol`; kept on `cm` per budget)."""
    fits = cm.__dict__.setdefault("_decode_thresholds", {})
    if policy.budget in fits:
        return fits[policy.budget]
    if cm._calibration is None:
        raise CalibrationError(_NO_CALIBRATION)
    changes = prompt_changes(cm, cm._calibration).flatten()
    run_fraction = lambda t: float((changes >= t).double().mean())   # noqa: E731 - non-increasing in t
    hi = float(changes.max()) * (1 + 1e-9) + 1e-12
    found = bisect_decreasing(run_fraction, policy.budget, 0.0, hi, iters=64, tol=tol / 4)
    if abs(run_fraction(found.best_x) - policy.budget) > tol:
        raise CalibrationError(f"ActivationSkip: no threshold runs {policy.budget:.3f} of the layers on the "
                               f"calibration data (closest {run_fraction(found.best_x):.3f} from "
                               f"{changes.numel()} row-layer pairs; give more calibration rows)")
    fits[policy.budget] = found.best_x
    return found.best_x
