"""Capture of a model's generation steps with the KV cache as explicit tensors.

Two graphs per model, both ATen GraphModules from `torch.export` with the batch, sequence and past lengths
dynamic:

    prefill(input_ids [B, S], attention_mask [B, S], position_ids [B, S])
        -> (logits [B, 1, V], key_i [B, Hkv, S, Dh], value_i ..., for each cached layer i)
    decode(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past_key_i [B, Hkv, P, Dh], ...)
        -> (logits [B, S, V], key_i [B, Hkv, P+S, Dh], value_i ..., for each cached layer i)

The cache *grows*: a decode step takes the past K/V of every layer and returns them with the S new positions
appended (the concatenation is inside the graph). S is 1 for plain decoding and n+1 when a speculative draft of
n tokens is verified.

How the model is called is captured, not assumed: the model's forward is replaced for the export by a function
of plain tensors that seeds a cache object with the past tensors (through `Cache.update`, the one method every
attention layer calls) and records what each layer's `update` returns. Nothing reads a cache class's fields, so
the graphs do not depend on one transformers release's cache internals. Which layers keep a cache, and the shape
of their K/V, is found by one probe call (`probe_cache`).

Layers in `pruned` get no cache entry: no input, no output. For the export they are seeded with zeros of the
right shape (so the captured graph is the model's); once the PruneBlocks pass has removed their block, nothing
reads those zeros and dead-code elimination removes them with the layer.
"""
from __future__ import annotations

import dataclasses
import inspect as _inspect

import torch
from torch import nn
from torch.export import Dim

from routefx.errors import CaptureError, UnsupportedModelError
from routefx.ir import capture_cache
from routefx.ir.capture import CaptureInfo, _drop_export_artifacts, _eval_mode, grouped_experts, normalise_ops

__all__ = ["CacheLayout", "probe_cache", "capture_prefill", "capture_decode", "supports_cache", "prompt_positions"]


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The model's KV-cache convention, found by `probe_cache`."""

    cache_kw: str                                # the forward's keyword for the cache object
    heads: tuple[int, ...]                       # K/V heads per cached layer
    head_dims: tuple[tuple[int, int], ...]       # (key, value) head dims per cached layer
    dtype: torch.dtype
    logits_to_keep: bool                         # forward takes logits_to_keep

    @property
    def layers(self) -> int:
        return len(self.heads)


def _cache_kw(model: nn.Module) -> str | None:
    params = _inspect.signature(model.forward).parameters
    for name in ("past_key_values", "cache"):    # the keyword was renamed between transformers releases
        if name in params:
            return name
    return None


def supports_cache(model: nn.Module) -> str | None:
    """None if the model can be captured with a KV cache; else why not."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "transformers is not installed"
    params = _inspect.signature(model.forward).parameters
    missing = [p for p in ("input_ids", "attention_mask", "position_ids") if p not in params]
    if not isinstance(model, PreTrainedModel) or _cache_kw(model) is None or missing:
        return (f"{type(model).__name__}.forward takes no KV cache (routefx captures a cache through a Hugging Face "
                f"cache argument with input_ids, attention_mask and position_ids; missing: "
                f"{missing + ([] if _cache_kw(model) else ['past_key_values'])})")
    return None


def _recording_cache():
    """A fresh cache object whose `update` records the full K/V it returns, per layer index."""
    from transformers import DynamicCache

    class _Recording(DynamicCache):
        def __init__(self):
            super().__init__()
            self.returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            self.returned[layer_idx] = (k, v)
            return k, v

    return _Recording()


def _call(model, layout_kw: str, keep_last: bool, input_ids, attention_mask, position_ids, past):
    """Run `model` on explicit tensors; `past` is one (key, value) pair per cached layer (or None). Returns
    (logits, {layer: (key, value)})."""
    cache = _recording_cache()
    for i, kv in enumerate(past):
        if kv is not None:
            cache.update(kv[0], kv[1], i)
    cache.returned = {}
    kwargs = {layout_kw: cache, "use_cache": True}
    if keep_last:
        kwargs["logits_to_keep"] = 1
    out = type(model).forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, cache.returned


def probe_cache(model: nn.Module) -> CacheLayout:
    """Call the model once (batch 1, 2 tokens) to find which layers keep a cache and the shapes of their K/V."""
    reason = supports_cache(model)
    if reason is not None:
        raise UnsupportedModelError(reason)
    kw = _cache_kw(model)
    ids = torch.ones(1, 2, dtype=torch.long, device=_device(model))
    with _eval_mode(model), torch.no_grad():
        try:
            _, returned = _call(model, kw, False, ids, torch.ones_like(ids),
                                torch.arange(2, device=ids.device)[None], [])
        except Exception as e:  # the model wants its own cache class (recurrent or compressed state, ...)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UnsupportedModelError(
                f"{type(model).__name__} does not run with a plain key/value cache (transformers' DynamicCache, "
                f"through which routefx captures the cache as tensors): {type(e).__name__}: {first}. routefx "
                "generates with a KV cache for models whose layers keep attention keys and values only "
                "(Cache.update); recurrent or compressed layer state is not supported") from e
    if sorted(returned) != list(range(len(returned))) or not returned:
        raise UnsupportedModelError(f"{type(model).__name__}'s cache updates layers {sorted(returned)}; routefx "
                                    "supports models whose every cached layer 0..L-1 updates once per call")
    kv = [returned[i] for i in range(len(returned))]
    keep = "logits_to_keep" in _inspect.signature(model.forward).parameters
    return CacheLayout(kw, tuple(k.shape[1] for k, _ in kv), tuple((k.shape[-1], v.shape[-1]) for k, v in kv),
                       kv[0][0].dtype, keep)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch as Hugging Face `generate` makes them: the count of real tokens so far
    minus one, 0 at padding. mask: [B, S] 0/1 -> [B, S] int64."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def cache_names(kept: list[int], prefix: str = "") -> list[str]:
    return [n for i in kept for n in (f"{prefix}key_{i}", f"{prefix}value_{i}")]


def _forward_fn(model, layout: CacheLayout, kept: list[int], decode: bool):
    """A function of named tensors (export binds inputs by name; *args are not allowed)."""
    past_names = cache_names(kept, "past_") if decode else []
    params = ["input_ids", "attention_mask", "position_ids"] + past_names
    src = (f"def forward({', '.join(params)}):\n"
           f"    return _body({', '.join(params[:3])}, [{', '.join(past_names)}])\n")

    def body(input_ids, attention_mask, position_ids, flat):
        past = []
        if decode:
            given = {i: (flat[2 * j], flat[2 * j + 1]) for j, i in enumerate(kept)}
            like = flat[0]  # [B, Hkv, P, Dh] of a kept layer: B and P for a pruned layer's placeholder zeros
            for i in range(layout.layers):
                if i in given:
                    past.append(given[i])
                else:
                    shape = lambda d: (like.shape[0], layout.heads[i], like.shape[2], d)  # noqa: E731
                    past.append((like.new_zeros(shape(layout.head_dims[i][0])),
                                 like.new_zeros(shape(layout.head_dims[i][1]))))
        logits, returned = _call(model, layout.cache_kw, layout.logits_to_keep and not decode, input_ids,
                                 attention_mask, position_ids, past)
        if sorted(returned) != list(range(layout.layers)):
            raise CaptureError(f"the cache was updated for layers {sorted(returned)}, expected "
                               f"0..{layout.layers - 1}")
        if not decode and not layout.logits_to_keep:
            logits = logits[:, -1:]
        return (logits, *[t for i in kept for t in returned[i]])

    ns = {"_body": body}
    exec(src, ns)  # noqa: S102 - a fixed template over generated parameter names
    return ns["forward"], params


def _export(model, fn, params, example: dict, what: tuple) -> torch.fx.GraphModule:
    """torch.export of the step `fn` (`what`: prefill or decode, the cached layers, the layout), or its kept
    result for the unchanged model (`capture_cache`: the same model compiled with several policies generates)."""
    shapes = {}
    for name in params:
        t = example[name]
        shapes[name] = {0: Dim.AUTO, 2: Dim.AUTO} if name.startswith("past_") else {0: Dim.AUTO, 1: Dim.AUTO}
        example[name] = t.contiguous()
    gm = capture_cache.exported(model, ("generation step", what, capture_cache.inputs_key(example)),
                                lambda: (_export_step(model, fn, example, shapes), None))[0]
    _drop_export_artifacts(gm)
    normalise_ops(gm)
    gm.meta["routefx"] = CaptureInfo(arg_names=(), constant_kwargs={})
    return gm


def _export_step(model, fn, example: dict, shapes: dict):
    own = model.__dict__.get("forward")
    model.forward = fn
    try:
        with _eval_mode(model), grouped_experts(model), torch.no_grad():
            return torch.export.export(model, (), kwargs=example, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export raises many exception types; re-raise as one typed error
        raise CaptureError(f"torch.export could not capture {type(model).__name__}'s generation step: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


# example sizes all different and > 1, so that export keeps each dynamic dim symbolic and unrelated
_B, _S, _P = 2, 3, 5


def _example_ids(model, batch, seq):
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2) or 2
    return torch.arange(batch * seq, device=_device(model)).reshape(batch, seq) % max(vocab - 1, 1) + 1


def capture_prefill(model: nn.Module, layout: CacheLayout, kept: list[int]) -> tuple[torch.fx.GraphModule, dict]:
    """The prefill graph (logits of the last position, K/V of the layers in `kept`) and its example inputs."""
    fn, params = _forward_fn(model, layout, kept, decode=False)
    ids = _example_ids(model, _B, _S)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "position_ids": torch.arange(_S, device=ids.device).expand(_B, _S)}
    return _export(model, fn, params, dict(example), ("prefill", tuple(kept), dataclasses.astuple(layout))), example


def capture_decode(model: nn.Module, layout: CacheLayout, kept: list[int]) -> tuple[torch.fx.GraphModule, dict]:
    """The decode graph (logits of every new position, K/V grown by the new positions) and its example inputs."""
    if not kept:
        raise UnsupportedModelError("every cached layer is pruned; routefx needs at least one layer with a cache")
    fn, params = _forward_fn(model, layout, kept, decode=True)
    ids = _example_ids(model, _B, _S)
    example = {"input_ids": ids, "attention_mask": torch.ones(_B, _P + _S, dtype=torch.long, device=ids.device),
               "position_ids": torch.arange(_P, _P + _S, device=ids.device).expand(_B, _S)}
    g = torch.Generator().manual_seed(0)
    for i in kept:
        for name, d in zip(("key", "value"), layout.head_dims[i]):
            example[f"past_{name}_{i}"] = torch.randn(_B, layout.heads[i], _P, d, generator=g).to(
                device=ids.device, dtype=layout.dtype)
    return _export(model, fn, params, dict(example), ("decode", tuple(kept), dataclasses.astuple(layout))), example
