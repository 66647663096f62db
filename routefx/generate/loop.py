"""The generation loop: prefill once, then one decode step per new token, with a growing KV cache.

Batches may be left-padded (`attention_mask` 0 on the left). Positions follow Hugging Face `generate`: the
cumulative count of real tokens minus one (0 at padding) for the prompt, then the last position plus one per new
token. A row stops at its first end-of-sequence token; from then on it receives the pad token, and the loop ends
when every row has stopped or `max_new_tokens` tokens were generated. The result is [B, S + n] like
`generate`'s `sequences`.

The settings (max_new_tokens, end and pad tokens, do_sample, the logits processors and warpers) come from the
model's `generation_config` and the caller's keyword arguments, resolved by transformers' own code as `generate`
resolves them (`routefx.generate.settings`); each step applies the processors to the float32 logits of the last
position and the sequence so far, then takes the argmax or one draw. Greedy output is token-identical to
`generate` with the same settings; beam search and the other strategies routefx has no path for are refused.

`decode_policy` (`routefx.generate.decode_policies`: DepthDecay, ActivationSkip, LayerSubset) skips layers per
decode step and row (`routefx.generate.skipping`); `GenerationStats.layer_fraction` says how much of the decode ran.

Models without a cache convention routefx can capture (plain `nn.Module` LMs taking only input_ids) generate
*uncached*: each step runs the compiled prefill graph on the whole sequence so far (quadratic in the length; said
so in `GenerationStats.mode`). So do models whose forward takes a cache argument but whose step cannot be captured
with transformers' DynamicCache (layer state of a cache class of its own, XLM's whole-sequence calls, a Duo or
pruning plan whose blocks the one-token step of a recurrent layer does not read as), with a warning that says
why; asked for a cache explicitly (`static_cache=True`, a `decode_policy`), they refuse. Layers that keep
recurrent state in transformers' cache layers (Mamba and the hybrids) decode with that state as explicit tensors
(`routefx.generate.step`).
"""
from __future__ import annotations

import dataclasses
import inspect as _inspect
import time
import warnings

import torch

from routefx.errors import BackendError, CaptureError, InputError, UnsupportedModelError
from routefx.generate.arrays import as_array, as_torch
from routefx.generate.graphs import generation_graphs
from routefx.generate.settings import resolve
from routefx.generate.skipping import SkipStepper
from routefx.generate.step import prompt_positions, supports_cache

__all__ = ["generate", "generate_with_stats", "GenerationStats", "Stepper"]


@dataclasses.dataclass
class GenerationStats:
    mode: str                    # "cached" | "uncached" | "static" | "static-cuda-graph" (routefx.generate.window)
    prompt_tokens: int           # B * S (padding included)
    new_tokens: int              # generated positions per row (the loop's steps)
    prefill_seconds: float
    decode_seconds: float        # every step after the prefill, sampling included
    batch: int = 1
    layer_fraction: float | None = None   # with a decode policy: fraction of (row, layer) pairs decode ran in full
    skip_counts: object = None            # with a decode policy: its `skipping.SkipCounts` (per-layer calls, rows)

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens per second of decode over the batch (B rows × steps after the first token)."""
        return self.batch * max(self.new_tokens - 1, 0) / self.decode_seconds if self.decode_seconds else 0.0


def _check(input_ids, attention_mask, max_new_tokens):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
            torch.int64, torch.int32) or 0 in input_ids.shape:
        raise InputError(f"input_ids must be a non-empty [batch, seq] integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {list(attention_mask.shape)}; input_ids has "
                         f"{list(input_ids.shape)}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()) or bool((mask.sum(1) == 0).any()):
        raise InputError("attention_mask must hold 0/1 with at least one 1 per row")
    if not bool((mask.cummax(1).values == mask).all()):
        raise InputError("attention_mask has padding after a real token; generate takes left padding only")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise InputError(f"max_new_tokens must be None or an int >= 0, got {max_new_tokens!r}")
    return input_ids.long(), mask


def _static(cm, ids, static_cache, decode_policy, cached) -> bool:
    """Whether to decode over a fixed-shape window (`routefx.generate.window`): asked for, or by default on
    CUDA with backend "triton" (CUDA-graph decode steps)."""
    if static_cache is None:
        return cached and decode_policy is None and ids.device.type == "cuda" and cm.backend == "triton"
    if static_cache and decode_policy is not None:
        raise InputError("static_cache=True cannot be combined with a decode_policy (its steps run other layers "
                         "per row); pass static_cache=False or no decode_policy")
    if static_cache and not cached:
        raise UnsupportedModelError(f"static_cache=True needs a KV cache; {supports_cache(cm._model)}")
    return bool(static_cache)


def generate_with_stats(cm, input_ids, attention_mask=None, *, max_new_tokens: int | None = None,
                        streamer=None, generator: torch.Generator | None = None, decode_policy=None,
                        logits_processor=None, static_cache: bool | None = None,
                        **settings) -> tuple[torch.Tensor, GenerationStats]:
    """`settings`: GenerationConfig fields (do_sample, temperature, top_k, eos_token_id, repetition_penalty, ...)
    over the model's generation_config, resolved as Hugging Face `generate` does (`routefx.generate.settings`)."""
    ids, mask = _check(input_ids, attention_mask, max_new_tokens)
    model = cm._model
    cfg = resolve(model, ids, mask, generator, logits_processor, max_new_tokens=max_new_tokens, **settings)
    max_new_tokens, eos, pad = cfg.max_new_tokens, cfg.eos, [cfg.pad]
    eos_t = torch.tensor(eos, dtype=torch.long, device=ids.device)
    B = ids.shape[0]
    cached = supports_cache(model) is None
    if decode_policy is not None and not cached:
        raise UnsupportedModelError(f"decode_policy needs a KV cache; {supports_cache(model)}")
    mode = "cached" if cached else "uncached"
    try:
        step = None
        if _static(cm, ids, static_cache, decode_policy, cached):
            from routefx.generate.window import WindowStepper
            graphs = ids.device.type == "cuda" and not cm.backend_options.get("cudagraphs")
            try:
                step = WindowStepper(cm, mask, max_new_tokens, cuda_graph=graphs)
                mode = "static-cuda-graph" if graphs else "static"
            except UnsupportedModelError:
                if static_cache:
                    raise
                # the default window does not suit this model (recurrent state, positions from the cache's length):
                # growing-cache steps
        if step is None and cached:
            step = SkipStepper(cm, mask, decode_policy) if decode_policy is not None else Stepper(cm, mask)
        elif step is None:
            step = _Uncached(cm, mask)
    except (UnsupportedModelError, CaptureError) as e:
        if not cached or decode_policy is not None or static_cache:
            raise
        # a forward that takes a cache argument but runs its own cache protocol (hybrid recurrent layers, XLM's
        # whole-sequence calls): the same outputs without a cache, and said so
        warnings.warn(f"routefx generate: {e}; generating uncached instead (each step runs the compiled model on "
                      "the whole sequence so far)", RuntimeWarning, stacklevel=2)
        step, mode = _Uncached(cm, mask), "uncached (no cache capture)"
    if streamer is not None:
        streamer.put(ids.cpu())
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    seq = ids
    t0 = time.perf_counter()
    try:
        logits = step.prefill(ids) if max_new_tokens else None
    except BackendError as e:
        if static_cache is not None or not mode.startswith("static"):
            raise
        # the default (CUDA-graph) decode could not capture this model's step: decode as before, and say so
        warnings.warn(f"routefx generate: {e}; decoding with a growing cache and no CUDA graphs instead",
                      RuntimeWarning, stacklevel=2)
        step, mode = Stepper(cm, mask), "cached (CUDA-graph capture failed)"
        logits = step.prefill(ids)
    t1 = time.perf_counter()
    rows = _embedding_rows(model)
    check_ids = logits is not None and rows is not None and logits.shape[-1] > rows
    n = 0
    for n in range(1, max_new_tokens + 1):
        scores = cfg.process(seq, logits.to(dtype=torch.float32, copy=True))   # [B, V]; seq: [B, S + n - 1]
        nxt = cfg.choose(scores)
        nxt = torch.where(unfinished, nxt, pad[0])
        if check_ids and int(nxt.max()) >= rows:
            raise InputError(f"the model chose token id {int(nxt.max())} at step {n}, past its input embedding's "
                             f"{rows} rows (its LM head has {logits.shape[-1]} outputs): the next step cannot "
                             "take it")
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if eos:
            unfinished &= ~torch.isin(nxt, eos_t)
        if n == max_new_tokens or not bool(unfinished.any()):
            break
        logits = step.decode(nxt[:, None])
    if streamer is not None:
        streamer.end()
    stats = GenerationStats(mode, ids.numel(), n, t1 - t0, time.perf_counter() - t1,
                            batch=B, layer_fraction=step.counts.fraction if decode_policy is not None else None,
                            skip_counts=step.counts if decode_policy is not None else None)
    return seq, stats


def _embedding_rows(model) -> int | None:
    """Rows of the model's input embedding (None where it does not say)."""
    try:
        emb = model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - a model without the Hugging Face accessor
        return None
    return getattr(emb, "num_embeddings", None)


def generate(cm, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens per row; returns [B, S + n] (see the module docstring)."""
    return generate_with_stats(cm, input_ids, attention_mask, **kwargs)[0]


_PATHS = ("arrays", "io_binding", "call")


class Stepper:
    """Prefill and decode graphs with the cache between them (a list of tensors in the graphs' order):
    `prefill(ids)` -> logits of the last prompt position [B, V]; `extend(new)` -> logits of S new tokens per row
    [B, S, V]; `decode(new)` -> logits of the last of them [B, V].

    How a decode step runs on ONNX Runtime (`path`; other backends always call their runner):
      "arrays"      (default) `OnnxRunner.run_arrays`: the session on numpy arrays, the cache a step returns fed
                    to the next as the arrays ONNX Runtime returned (views of its buffers), checked for dtype and
                    rank only; the logits come back as a torch view. The least per-step work measured.
      "io_binding"  `OnnxRunner.run_ortvalues`: the cache kept as OrtValues bound as the next step's inputs.
      "call"        the runner's plain call (inputs checked, outputs rebuilt as torch tensors): the reference.
    `past` reads the cache as torch tensors (views) and may be assigned torch tensors (a rewind)."""

    def __init__(self, cm, mask, *, path: str = "arrays"):
        if path not in _PATHS:
            raise InputError(f"path must be one of {_PATHS}, got {path!r}")
        self.g = generation_graphs(cm)
        self.mask = mask
        self._past: list = []                # torch tensors, numpy arrays or OrtValues, in the graphs' order
        self.pos = None
        self.path = path

    @property
    def past(self) -> list[torch.Tensor]:
        return [as_torch(t) for t in self._past]

    @past.setter
    def past(self, values) -> None:
        self._past = list(values)

    def prefill(self, ids):
        pos = prompt_positions(self.mask)
        feeds = {"input_ids": ids, "attention_mask": self.mask, "position_ids": pos}
        out = self.g.prefill_for(feeds).run(**feeds)
        self.pos, self._past = pos[:, -1:], list(out[1:])
        return out[0][:, -1]

    def decode(self, new):
        """new: [B, S] tokens appended to every row -> logits of the last new position [B, V]."""
        logits = self.extend(new)
        return logits[:, -1]

    def extend(self, new):
        """Run the decode graph on S new tokens per row; returns their logits [B, S, V] and keeps the cache."""
        B, S = new.shape
        self.mask = torch.cat([self.mask, self.mask.new_ones(B, S)], dim=1)
        pos = self.pos + torch.arange(1, S + 1, device=self.pos.device)
        # a graph valid for these sizes (export's guards, checked every step)
        run = self.g.decode_for({"input_ids": new, "attention_mask": self.mask, "position_ids": pos,
                                 **dict(zip(self.g.past_names, self._past))}).run
        if self.path == "arrays" and getattr(run, "takes_arrays", False):
            feeds = {"input_ids": as_array(new), "attention_mask": as_array(self.mask), "position_ids": as_array(pos)}
            feeds.update(zip(self.g.past_names, map(as_array, self._past)))
            out = run.run_arrays(feeds)
        elif self.path == "io_binding" and hasattr(run, "run_ortvalues"):
            out = run.run_ortvalues(input_ids=new, attention_mask=self.mask, position_ids=pos,
                                    **dict(zip(self.g.past_names, self._past)))
        else:
            out = run(input_ids=new, attention_mask=self.mask, position_ids=pos,
                      **dict(zip(self.g.past_names, self.past)))
        self.pos, self._past = pos[:, -1:], list(out[1:])
        return as_torch(out[0])


class _Uncached:
    """Whole-sequence calls of the compiled model (no cache convention to capture)."""

    def __init__(self, cm, mask):
        self.cm = cm
        self.mask = mask
        params = _inspect.signature(cm._model.forward).parameters
        self.takes_mask = "attention_mask" in params
        # as `generate`: positions from the mask (0 at padding) where the forward takes them
        self.takes_pos = self.takes_mask and "position_ids" in params
        self.by_name = "input_ids" in params     # else the ids go first, by position (`forward(self, tokens)`)
        if not self.takes_mask and not bool(mask.all()):
            raise InputError(f"{type(cm._model).__name__}.forward takes no attention_mask, so its batches cannot "
                             "be padded; pass rows of equal length without a mask")
        self.seq = None

    def _run(self):
        kw = {"attention_mask": self.mask} if self.takes_mask else {}
        if self.takes_pos:
            kw["position_ids"] = prompt_positions(self.mask)   # [B, L]
        out = self.cm(input_ids=self.seq, **kw) if self.by_name else self.cm(self.seq, **kw)
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
        return logits[:, -1]

    def prefill(self, ids):
        _check_inputs_for_generation(self.cm._model, ids, self.mask)
        self.seq = ids
        return self._run()

    def decode(self, new):
        self.seq = torch.cat([self.seq, new], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)
        return self._run()


def _check_inputs_for_generation(model, ids, mask) -> None:
    """Refuse models whose `generate` feeds the forward other token ids than the sequence so far (XLM appends a
    mask token and predicts at it): generating from the sequence itself would give other tokens than `generate`.
    Models whose `prepare_inputs_for_generation` needs more than the ids and mask are not judged here."""
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    if prepare is None:
        return
    try:
        fed = prepare(ids, attention_mask=mask, use_cache=False).get("input_ids")
    except Exception:  # noqa: BLE001 - transformers' many signatures; nothing to judge by then
        return
    if isinstance(fed, torch.Tensor) and (fed.shape != ids.shape or not torch.equal(fed, ids)):
        raise UnsupportedModelError(
            f"{type(model).__name__}.prepare_inputs_for_generation feeds the model other token ids than the sequence "
            f"so far (shape {list(ids.shape)} -> {list(fed.shape)}); routefx generates from the sequence itself, so "
            "its tokens would not be the model's own generate's")
