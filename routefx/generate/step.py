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

Indexer keys. Sparse attention (DeepSeek-V3.2's DSA, GLM-5, HY-V4, Dots3, AXK2) selects each query's keys with an
indexer whose keys transformers keeps in the layer's cache beside its K/V (`DynamicIndexedLayer.update_indexer`,
[B, P, d], growing along dim 1). Where the config names such layers, the cache object has them, and each one's
indexer keys are one more input and output of the decode graph (`index_{layer}`, after the layer's K/V), seeded
through `update_indexer`. Speculative decoding cuts them back and the fixed-shape window shifts them with the
K/V, exported generation graphs pass them as they pass K/V, and a decode policy's per-layer pieces take them
with the K/V (a skipped layer's K/V piece computes them too). (The
top-k's width, `min(index_topk, P + S)`, stays symbolic in the graphs: one graph serves both sides of it.)

Layers in `pruned` get no cache entry: no input, no output. For the export they are seeded with zeros of the
right shape (so the captured graph is the model's); once the PruneBlocks pass has removed their block, nothing
reads those zeros and dead-code elimination removes them with the layer.

Recurrent state. Where the model's config names layers that keep state in transformers' own cache layers
(`DynamicCache(config=...)`: linear-attention, short-convolution and hybrid layers: Mamba, Mamba-2 hybrids such
as Bamba, Jamba, Falcon-H1, NemotronH and Zamba, Qwen3-Next's and OLMo-Hybrid's delta rule, LFM3's convolutions),
the cache object has those layers (their keys and values still grow in full, as on the K/V path), and each state
a layer keeps is one more input and output of the decode graph, fixed-shape [B, ...] (`StateSlot`:
`conv_{layer}`, `recurrent_{layer}`, `_{index}` for a layer's further states), after the layer's K/V. A decode
seeds them through the cache's own `update_conv_state` / `update_recurrent_state` (which mark the layer as having
a past) and reads them back with `get_conv_state` / `get_recurrent_state` after the call: the model's code may
update them in place (Mamba's one-token convolution and scan steps do). Such a state cannot be cut back to an
earlier position, so the decode step takes one token (no speculative verification, no fixed-shape window, no
per-row layer skipping: refused by name), and where the model's own `generate` feeds no attention mask to a
decode step (Mamba's `prepare_inputs_for_generation`) neither does the graph. The model's code branches on
lengths here (a convolution state padded to its kernel when the prompt is shorter, Mamba-1's scan as a loop over
positions), so export's guards are kept with each graph and checked before it runs; inputs outside them get a
graph captured at their sizes (`routefx.generate.graphs`).
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
from routefx.ir.tracing import tracing

__all__ = ["CacheLayout", "StateSlot", "probe_cache", "capture_prefill", "capture_decode", "supports_cache",
           "prompt_positions", "cache_names", "cache_entries", "entry_shape", "position_dim"]


@dataclasses.dataclass(frozen=True)
class StateSlot:
    """One recurrent-state tensor a layer keeps between calls (transformers' linear-attention cache layers: a
    causal convolution's last inputs, a state-space or linear-attention scan's state). Fixed shape per row."""

    layer: int
    kind: str                                    # "conv" | "recurrent" | a per-layer list attribute of the cache
    index: int                                   # the layer's state index (a layer may keep several)
    shape: tuple[int, ...]                       # without the batch dim
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.layer}" + (f"_{self.index}" if self.index else "")


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The model's cache convention, found by `probe_cache`: which layers keep attention keys and values (growing
    along the position dim) and which keep recurrent state (fixed shape)."""

    cache_kw: str                                # the forward's keyword for the cache object
    heads: tuple[int, ...]                       # K/V heads per model layer (0: the layer keeps no K/V)
    head_dims: tuple[tuple[int, int], ...]       # (key, value) head dims per model layer
    dtype: torch.dtype
    logits_to_keep: bool                         # forward takes logits_to_keep
    states: tuple[StateSlot, ...] = ()           # recurrent state, in layer order
    layer_types: tuple[tuple[str, int], ...] | None = None   # (cache layer type, states) per layer; None: K/V only
    decode_mask: bool = True                     # the decode step passes the attention mask to the model
    positions: bool = True                       # the forward takes position_ids
    index_dims: tuple[int, ...] = ()             # per model layer: its indexer keys' width (0: none; see below)
    cache_class: type | None = None              # the model's own cache class (None: transformers' DynamicCache)

    @property
    def layers(self) -> int:
        return len(self.heads)

    @property
    def kv(self) -> tuple[int, ...]:
        """The layers that keep keys and values."""
        return tuple(i for i, h in enumerate(self.heads) if h)

    @property
    def recurrent(self) -> bool:
        """Whether some layer keeps recurrent state (such a cache cannot be cut back or shifted: no speculative
        decoding, no fixed-shape window, no per-row layer skipping)."""
        return bool(self.states)

    @property
    def indexed(self) -> tuple[int, ...]:
        """The layers that keep indexer keys (growing along the position dim, [B, P, d])."""
        return tuple(i for i, d in enumerate(self.index_dims) if d)

    def refuse_recurrent(self, model: nn.Module, what: str, indexer_ok: bool = False) -> None:
        """Raise UnsupportedModelError for `what` (a mode that cuts back, shifts or splits the cache) where some
        layer keeps recurrent state, or indexer keys unless `indexer_ok` (the mode handles them)."""
        if self.indexed and not indexer_ok:
            raise UnsupportedModelError(
                f"{what} needs a cache of keys and values only; {type(model).__name__}'s layers "
                f"{list(self.indexed)} keep indexer keys too (sparse attention's key selection). Plain generate "
                "(prefill, then decode steps) runs such models with them as explicit tensors")
        if self.recurrent:
            layers = sorted({u.layer for u in self.states})
            raise UnsupportedModelError(
                f"{what} needs a cache of keys and values only; {type(model).__name__}'s layers {layers} keep "
                "recurrent state (a convolution's last inputs, a scan's state), which cannot be cut back to an "
                "earlier position or split per layer and row. Plain generate (prefill, then one token per step) "
                "runs such models with their state as explicit tensors")


def _cache_kw(model: nn.Module) -> str | None:
    params = _inspect.signature(model.forward).parameters
    for name in ("past_key_values", "cache"):    # the keyword was renamed between transformers releases
        if name in params:
            return name
    return None


def supports_cache(model: nn.Module) -> str | None:
    """None if the model can be captured with a cache; else why not."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return "transformers is not installed"
    params = _inspect.signature(model.forward).parameters
    # position_ids may be missing where the model has no positions to give (a Mamba stack: recurrent state only)
    # or computes them itself from the cache's length, as its own generate lets it
    need = ("input_ids", "attention_mask")
    missing = [p for p in need if p not in params]
    if not isinstance(model, PreTrainedModel) or _cache_kw(model) is None or missing:
        return (f"{type(model).__name__}.forward takes no KV cache (routefx captures a cache through a Hugging Face "
                f"cache argument with {', '.join(need)}; missing: "
                f"{missing + ([] if _cache_kw(model) else ['past_key_values'])})")
    return None


def _state_layer_types(model: nn.Module) -> tuple[tuple[str, int], ...] | None:
    """(cache layer type, number of states) per layer from the model's config, when some layer keeps recurrent
    state or indexer keys in transformers' own cache (`DynamicCache(config=...)`: linear-attention, conv and hybrid
    layers; sparse attention's indexed layers); None when every layer keeps keys and values only (or this
    transformers has no such layers)."""
    try:
        from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, LinearAttentionCacheLayerMixin,
                                              get_layer_types_and_kwargs)
        cfg = model.config.get_text_config(decoder=True)
        types, kwargs = get_layer_types_and_kwargs(cfg)
    except Exception:  # noqa: BLE001 - an older transformers, a config without per-layer fields: K/V only
        return None
    cls = [DYNAMIC_LAYER_TYPE_MAPPING.get(t) for t in types]
    if not any(isinstance(c, type) and (issubclass(c, LinearAttentionCacheLayerMixin) or _indexes(c)) for c in cls):
        return None
    return tuple((t, int(kw.get("number_of_states", 1))) for t, kw in zip(types, kwargs))


def _keeps(kind: str) -> str | None:
    """What a cache layer of this config type keeps: "state" (recurrent, and maybe K/V too), "kv", or None."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, DummyLayer, LinearAttentionCacheLayerMixin
    cls = DYNAMIC_LAYER_TYPE_MAPPING.get(kind)
    if isinstance(cls, type) and issubclass(cls, LinearAttentionCacheLayerMixin):
        return "state"
    return None if cls is DummyLayer else "kv"


def _indexes(cls) -> bool:
    """Whether a cache layer class keeps indexer keys (transformers' `DynamicIndexedLayer`: `update_indexer`)."""
    return callable(getattr(cls, "update_indexer", None))


def _cache_layer(kind: str, states: int):
    """A cache layer for one model layer: transformers' own for recurrent state; keys and values always grow in
    full (a sliding window is the mask's business, as on the K/V-only path)."""
    from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, CacheLayerMixin, DummyLayer, DynamicLayer,
                                          LinearAttentionAndFullAttentionLayer, LinearAttentionCacheLayerMixin,
                                          LinearAttentionLayer)
    cls = DYNAMIC_LAYER_TYPE_MAPPING.get(kind, DynamicLayer)
    if isinstance(cls, type) and issubclass(cls, LinearAttentionCacheLayerMixin):
        both = issubclass(cls, CacheLayerMixin)
        return (LinearAttentionAndFullAttentionLayer if both else LinearAttentionLayer)(number_of_states=states)
    if isinstance(cls, type) and issubclass(cls, DynamicLayer) and _indexes(cls):
        return cls()
    return DummyLayer() if cls is DummyLayer else DynamicLayer()


def _recording_cache(layer_types=None, own: type | None = None):
    """A fresh cache object that records, per layer index, the full K/V its `update` returns and which recurrent
    states were updated. `layer_types` (from `_state_layer_types`): one cache layer per model layer, as the model's
    own generate builds them; None: transformers' DynamicCache, its layers made as they are updated. `own`: the
    model's own cache class (a DynamicCache that keeps other per-layer tensors in list attributes: MiniMax's
    linear-attention states), made as the model makes it."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    class _Recording(own or DynamicCache):
        def __init__(self):
            if own is not None or layer_types is None:
                super().__init__()
            else:
                Cache.__init__(self, layers=[_cache_layer(t, n) for t, n in layer_types])
            self.returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            self.updated: set[tuple[int, str, int]] = set()
            self.indexed: dict[int, torch.Tensor] = {}

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            self.returned[layer_idx] = (k, v)
            return k, v

        def update_indexer(self, indexer_key_states, layer_idx, *args, **kwargs):
            keys = super().update_indexer(indexer_key_states, layer_idx, *args, **kwargs)
            self.indexed[layer_idx] = keys
            return keys

        def update_conv_state(self, conv_states, layer_idx, state_idx=0, **kwargs):
            self.updated.add((layer_idx, "conv", state_idx))
            return super().update_conv_state(conv_states, layer_idx, state_idx, **kwargs)

        def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
            self.updated.add((layer_idx, "recurrent", state_idx))
            return super().update_recurrent_state(recurrent_states, layer_idx, state_idx, **kwargs)

        def state(self, slot) -> torch.Tensor | None:
            layer, kind, index = slot
            if kind in ("conv", "recurrent"):
                get = self.get_conv_state if kind == "conv" else self.get_recurrent_state
                return get(layer, state_idx=index)
            items = getattr(self, kind, None)           # a list attribute of the model's own cache class
            t = items[layer] if isinstance(items, list) and layer < len(items) else None
            return t if isinstance(t, torch.Tensor) else None

        def listed(self) -> set[tuple[int, str, int]]:
            """(layer, attribute, 0) of every tensor the model's own cache class keeps in a per-layer list."""
            if own is None:
                return set()
            return {(i, name, 0) for name, items in vars(self).items() if isinstance(items, list) and name != "layers"
                    for i, t in enumerate(items) if isinstance(t, torch.Tensor)}

        def seed_listed(self, slot, t: torch.Tensor) -> None:
            """Put `t` where the model's own cache class keeps `slot` (its setter `set_<attribute>` where it has
            one, which fills the layers before with what the class uses for none)."""
            setter = getattr(self, f"set_{slot.kind}", None)
            if callable(setter):
                setter(slot.layer, t)
                return
            items = getattr(self, slot.kind)
            items.extend([None] * (slot.layer + 1 - len(items)))
            items[slot.layer] = t

    return _Recording()


def _call(model, layout: CacheLayout, keep_last: bool, decode: bool, input_ids, attention_mask, position_ids,
          kv: dict, states: dict, index: dict | None = None):
    """Run `model` on explicit tensors: `kv` {layer: (key, value)}, `states` {StateSlot: tensor} and `index`
    {layer: indexer keys} seed the cache (empty for a prefill). Returns (logits, {layer: (key, value)},
    {(layer, kind, index): state}, the cache: its `indexed` {layer: indexer keys}) after the call."""
    cache = _recording_cache(layout.layer_types, layout.cache_class)
    for i, (k, v) in kv.items():
        cache.update(k, v, i)
    for i, keys in (index or {}).items():
        cache.update_indexer(keys, i)
    for slot, t in states.items():   # through the cache's own update: it marks the layer as having a past
        if slot.kind == "conv":
            cache.update_conv_state(t, slot.layer, slot.index)
        elif slot.kind == "recurrent":
            cache.update_recurrent_state(t, slot.layer, slot.index)
        else:
            cache.seed_listed(slot, t)
    cache.returned, cache.updated, cache.indexed = {}, set(), {}
    kwargs = {layout.cache_kw: cache, "use_cache": True}
    if keep_last:
        kwargs["logits_to_keep"] = 1
    if layout.positions:
        kwargs["position_ids"] = position_ids
    if layout.decode_mask or not decode:
        kwargs["attention_mask"] = attention_mask
    out = type(model).forward(model, input_ids=input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    # every state the layout knows, read back after the call: a decode step may update a state in place (Mamba's
    # causal_conv1d_update / selective_state_update) instead of through the cache's update methods
    slots = sorted(cache.updated | cache.listed() | {(u.layer, u.kind, u.index) for u in layout.states})
    return logits, cache.returned, {u: cache.state(u) for u in slots}, cache


def _decode_feeds(model, kw: str, cache, ids, mask) -> dict | None:
    """What the model's own generate feeds a decode step whose cache holds all of `ids` but the last token, asked
    of its `prepare_inputs_for_generation`; None where that cannot be asked (transformers' many signatures)."""
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    # transformers 5's generate says how many tokens are new; an earlier prepare slices by the cache itself
    for new in ({"next_sequence_length": 1}, {}):
        try:
            fed = prepare(ids, **{kw: cache}, attention_mask=mask, use_cache=True, is_first_iteration=False, **new)
        except TypeError:
            continue
        except Exception:  # noqa: BLE001 - transformers' many signatures: generate's default
            return None
        return fed if isinstance(fed, dict) else None
    return None


def _refuse_whole_sequence_steps(model, fed: dict | None, ids) -> None:
    """A model whose generate feeds each cached step the whole sequence (CPM-Ant's forward slices the cached
    prefix off itself) does not take the new tokens alone, which routefx's decode graph gives it."""
    new = None if fed is None else fed.get("input_ids")
    if isinstance(new, torch.Tensor) and new.dim() == 2 and new.shape[1] == ids.shape[1]:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s generate feeds each cached step the whole sequence so far "
            f"({new.shape[1]} tokens with {ids.shape[1] - 1} cached), not the new tokens alone: its forward "
            "slices the cache's part off itself; routefx's decode graph takes the new tokens only")


def _own_cache_class(model: nn.Module, ids: torch.Tensor) -> type | None:
    """The cache class the model makes for itself when called with use_cache and no cache, where it is a
    DynamicCache of its own (MiniMax's `MiniMaxCache`); else None."""
    from transformers import DynamicCache
    try:
        out = type(model).forward(model, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    except Exception:  # noqa: BLE001 - a model that cannot run this way has no class to offer
        return None
    cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
    cls = type(cache)
    return cls if isinstance(cache, DynamicCache) and cls is not DynamicCache else None


def _no_capturable_cache(model: nn.Module, own: type | None, e: Exception) -> UnsupportedModelError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return UnsupportedModelError(
        f"{type(model).__name__} does not run with transformers' DynamicCache"
        + (f" or its own {own.__name__}" if own is not None else "")
        + f" (through which routefx captures the cache as tensors): {type(e).__name__}: {first}. routefx generates "
        "with a cache for models whose layers keep attention keys and values (Cache.update), indexer keys "
        "(update_indexer), transformers' linear-attention states (update_conv_state / update_recurrent_state) or "
        "tensors in per-layer lists of a DynamicCache of their own; other layer state is not supported")


def probe_cache(model: nn.Module) -> CacheLayout:
    """Call the model once (batch 1, 2 tokens) to find which layers keep a cache and the shapes of what they keep."""
    reason = supports_cache(model)
    if reason is not None:
        raise UnsupportedModelError(reason)
    kw = _cache_kw(model)
    types = _state_layer_types(model)
    params = _inspect.signature(model.forward).parameters
    ids = torch.ones(1, 2, dtype=torch.long, device=_device(model))
    probe = CacheLayout(kw, (), (), torch.float32, False, layer_types=types, positions="position_ids" in params)
    with _eval_mode(model), torch.no_grad():
        def run(layout):
            return _call(model, layout, False, False, ids, torch.ones_like(ids),
                         torch.arange(2, device=ids.device)[None], {}, {})
        try:
            _, returned, states, cache = run(probe)
        except Exception as e:  # the model wants its own cache class (per-layer state of its own, ...)
            own = _own_cache_class(model, ids)
            if own is None:
                raise _no_capturable_cache(model, None, e) from e
            probe = dataclasses.replace(probe, cache_class=own)
            try:
                _, returned, states, cache = run(probe)
            except Exception as e2:  # noqa: BLE001 - refused with what the model raised
                raise _no_capturable_cache(model, own, e2) from e2
        seq = ids.new_ones(1, 3)
        fed = _decode_feeds(model, kw, cache, seq, seq)
        _refuse_whole_sequence_steps(model, fed, seq)
        # Mamba's generate drops the mask once the cache holds the prompt
        decode_mask = types is None or fed is None or "attention_mask" not in fed or fed["attention_mask"] is not None
    kept_elsewhere = [i for i, layer in enumerate(getattr(cache, "layers", ()))
                      if getattr(layer, "indexer_position_ids", None) is not None]
    if kept_elsewhere:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s layers {kept_elsewhere} keep their indexer's position ids in the cache layer "
            "(`indexer_position_ids`, set by the model's code), which routefx does not capture; routefx captures "
            "keys and values, indexer keys (update_indexer) and linear-attention states")
    n = len(types) if types is not None else len(returned)
    if types is None and (sorted(returned) != list(range(n)) or not returned):
        raise UnsupportedModelError(f"{type(model).__name__}'s cache updates layers {sorted(returned)}; routefx "
                                    "supports models whose every cached layer 0..L-1 updates once per call")
    missing = [u for u in states.values() if u is None]
    if types is not None and (not set(returned) <= set(range(n)) or missing or not (returned or states)):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s cache was updated for K/V layers {sorted(returned)} and states "
            f"{sorted(states)} of {n} layers; routefx supports a layer's state that the cache gives back "
            "(a conv state updated before its recurrent state)")
    if types is not None:
        # a layer the config says keeps state or keys and values but that put none in the cache keeps it
        # elsewhere (RecurrentGemma's recurrent blocks hold theirs in module attributes): not captured
        quiet = [i for i, (t, _) in enumerate(types) if _keeps(t) == "state" and not any(u[0] == i for u in states)
                 or _keeps(t) == "kv" and i not in returned]
        if quiet:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s layers {quiet} are {sorted({types[i][0] for i in quiet})} layers by "
                "its config but put no state in the cache (state kept elsewhere, such as in module "
                "attributes, is not captured)")
    heads = tuple(returned[i][0].shape[1] if i in returned else 0 for i in range(n))
    dims = tuple((returned[i][0].shape[-1], returned[i][1].shape[-1]) if i in returned else (0, 0) for i in range(n))
    slots = tuple(StateSlot(i, kind, s, tuple(t.shape[1:]), t.dtype) for (i, kind, s), t in states.items())
    dtype = next(iter(returned.values()))[0].dtype if returned else next(iter(states.values())).dtype
    if any(t.dim() != 3 or t.dtype != dtype for t in cache.indexed.values()):
        raise UnsupportedModelError(f"{type(model).__name__}'s indexer keys are "
                                    f"{[(list(t.shape), t.dtype) for t in cache.indexed.values()]}; routefx "
                                    f"captures indexer keys of shape [batch, positions, width] in {dtype}")
    index = tuple(cache.indexed[i].shape[-1] if i in cache.indexed else 0 for i in range(n))
    keep = "logits_to_keep" in params
    return CacheLayout(kw, heads, dims, dtype, keep, slots, types, decode_mask, "position_ids" in params,
                       index if any(index) else (), probe.cache_class)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch as Hugging Face `generate` makes them: the count of real tokens so far
    minus one, 0 at padding. mask: [B, S] 0/1 -> [B, S] int64."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def cache_entries(layout: CacheLayout, kept: list[int]) -> list[tuple[int, str, object]]:
    """The cache tensors of the layers in `kept`, in the graphs' order: per layer its key and value, its indexer
    keys, then its recurrent states. Each is (layer, name, StateSlot or None)."""
    slots: dict[int, list[StateSlot]] = {}
    for slot in layout.states:
        slots.setdefault(slot.layer, []).append(slot)
    out = []
    for i in kept:
        if layout.heads[i]:
            out += [(i, f"key_{i}", None), (i, f"value_{i}", None)]
        if i in layout.indexed:
            out.append((i, f"index_{i}", None))
        out += [(i, slot.name, slot) for slot in slots.get(i, ())]
    return out


def position_dim(name: str) -> int | None:
    """The dim a cache entry grows along (its name with or without "past_"): 2 for K/V [B, H, P, d], 1 for
    indexer keys [B, P, d]; None for recurrent state (fixed shape)."""
    name = name.removeprefix("past_")
    return 2 if name.startswith(("key_", "value_")) else 1 if name.startswith("index_") else None


def entry_shape(layout: CacheLayout, layer: int, name: str, slot, batch: int, past: int) -> tuple[tuple, torch.dtype]:
    """(shape, dtype) of the cache entry `name` of `layer` (`cache_entries`) for `batch` rows and `past` positions."""
    if slot is not None:
        return (batch, *slot.shape), slot.dtype
    if name.startswith("index_"):
        return (batch, past, layout.index_dims[layer]), layout.dtype
    return (batch, layout.heads[layer], past, layout.head_dims[layer][name.startswith("value_")]), layout.dtype


def cache_names(layout: CacheLayout, kept: list[int], prefix: str = "") -> list[str]:
    return [prefix + name for _, name, _ in cache_entries(layout, kept)]


def _forward_fn(model, layout: CacheLayout, kept: list[int], decode: bool):
    """A function of named tensors (export binds inputs by name; *args are not allowed)."""
    entries = cache_entries(layout, kept) if decode else []
    past_names = ["past_" + name for _, name, _ in entries]
    params = ["input_ids", "attention_mask", "position_ids"] + past_names
    src = (f"def forward({', '.join(params)}):\n"
           f"    return _body({', '.join(params[:3])}, [{', '.join(past_names)}])\n")
    kept_kv = [i for i in kept if layout.heads[i]]

    def body(input_ids, attention_mask, position_ids, flat):
        kv, states, index = {}, {}, {}
        if decode:
            given = dict(zip(past_names, flat))
            # B and P for a pruned layer's placeholder zeros: from a kept layer's K/V, else from the inputs
            like = given[f"past_key_{kept_kv[0]}"] if kept_kv else None
            B = like.shape[0] if like is not None else input_ids.shape[0]
            P = like.shape[2] if like is not None else attention_mask.shape[1] - input_ids.shape[1]
            for i in layout.kv:
                if i in kept:
                    kv[i] = (given[f"past_key_{i}"], given[f"past_value_{i}"])
                else:
                    shape = lambda d: (B, layout.heads[i], P, d)  # noqa: E731
                    kv[i] = (input_ids.new_zeros(shape(layout.head_dims[i][0]), dtype=layout.dtype),
                             input_ids.new_zeros(shape(layout.head_dims[i][1]), dtype=layout.dtype))
            for slot in layout.states:
                states[slot] = given["past_" + slot.name] if slot.layer in kept else \
                    input_ids.new_zeros((B, *slot.shape), dtype=slot.dtype)
            for i in layout.indexed:
                index[i] = given[f"past_index_{i}"] if i in kept else \
                    input_ids.new_zeros((B, P, layout.index_dims[i]), dtype=layout.dtype)
        logits, returned, updated, cache = _call(model, layout, layout.logits_to_keep and not decode, decode,
                                                 input_ids, attention_mask, position_ids, kv, states, index)
        found = sorted((u.layer, u.kind, u.index) for u in layout.states)
        if sorted(returned) != list(layout.kv) or sorted(updated) != found or any(t is None for t in updated.values()) \
                or sorted(cache.indexed) != list(layout.indexed):
            raise CaptureError(f"the cache was updated for K/V layers {sorted(returned)}, states "
                               f"{sorted(k for k, t in updated.items() if t is not None)} and indexer keys "
                               f"{sorted(cache.indexed)}; the probe found K/V layers {list(layout.kv)}, states "
                               f"{found} and indexer keys {list(layout.indexed)}")
        if not decode and not layout.logits_to_keep:
            logits = logits[:, -1:]
        out = []
        for i, name, slot in cache_entries(layout, kept):
            if slot is not None:
                out.append(updated[(slot.layer, slot.kind, slot.index)])
            elif name.startswith("index_"):
                out.append(cache.indexed[i])
            else:
                out.append(returned[i][0 if name.startswith("key_") else 1])
        return (logits, *out)

    ns = {"_body": body}
    exec(src, ns)  # noqa: S102 - a fixed template over generated parameter names
    return ns["forward"], params


def _export(model, fn, params, example: dict, what: tuple, recurrent: bool) -> torch.fx.GraphModule:
    """torch.export of the step `fn` (`what`: prefill or decode, the cached layers, the layout), or its kept
    result for the unchanged model (`capture_cache`: the same model compiled with several policies generates)."""
    shapes = {}
    for name in params:
        t = example[name]
        if not name.startswith("past_"):      # the step's inputs: batch and length
            shapes[name] = {0: Dim.AUTO, 1: Dim.AUTO}
        else:                                 # batch, and the positions of an entry that grows
            shapes[name] = {0: Dim.AUTO, **({d: Dim.AUTO} if (d := position_dim(name)) else {})}
        example[name] = t.contiguous()
    gm = capture_cache.exported(model, ("generation step", what, capture_cache.inputs_key(example)),
                                lambda: (_export_step(model, fn, example, shapes), None))[0]
    _drop_export_artifacts(gm)
    normalise_ops(gm)
    if recurrent:
        # a pruned layer's state: updated in place by the model's code, then never read (not an output); left in,
        # its copy reads the layer's values from outside the layer, which PruneLayers refuses as a later read
        gm.graph.eliminate_dead_code()
        gm.recompile()
    # what a branch reads to mix tokens (`recognize`): the K/V and scan states; not a short convolution's last
    # inputs, which the forward's convolution reads as a per-token branch of its own (LFM), so that the decode
    # graph has the forward's blocks
    gm.meta["routefx"] = CaptureInfo(arg_names=(), constant_kwargs={}, state_inputs=tuple(
        n for n in params if n.startswith("past_") and not n.startswith("past_conv_")))
    return gm


def _export_step(model, fn, example: dict, shapes: dict):
    own = model.__dict__.get("forward")
    model.forward = fn
    try:
        with _eval_mode(model), grouped_experts(model), torch.no_grad(), tracing():
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


def _prefill_length(layout: CacheLayout) -> int:
    """The first prefill capture's length: longer than every convolution state (a prompt shorter than the kernel
    takes another branch of the model's code: a graph valid for short prompts only, read as other blocks)."""
    kernel = max((u.shape[-1] for u in layout.states if u.kind == "conv"), default=0)
    return max(_S, 2 * kernel + 1)


def capture_prefill(model: nn.Module, layout: CacheLayout, kept: list[int], example: dict | None = None
                    ) -> tuple[torch.fx.GraphModule, dict]:
    """The prefill graph (logits of the last position, the cache of the layers in `kept`) and its example inputs
    (`example`: inputs of the sizes to capture at, where a first capture's guards exclude them)."""
    fn, params = _forward_fn(model, layout, kept, decode=False)
    if example is None:
        S = _prefill_length(layout)
        ids = _example_ids(model, _B, S)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "position_ids": torch.arange(S, device=ids.device).expand(_B, S)}
    return _export(model, fn, params, dict(example), ("prefill", tuple(kept), dataclasses.astuple(layout)),
                   layout.recurrent), example


def capture_decode(model: nn.Module, layout: CacheLayout, kept: list[int], example: dict | None = None,
                   one_token: bool = False) -> tuple[torch.fx.GraphModule, dict]:
    """The decode graph (logits of every new position, the cache grown by the new positions) and its example
    inputs. With recurrent state the step takes one token per row (a draft cannot be verified: the state cannot be
    cut back), so it is captured on one; so it is with `one_token` (a model whose code takes one new token per
    cached step only: ProphetNet asserts it)."""
    if not any(layout.heads[i] for i in kept) and not any(u.layer in kept for u in layout.states):
        raise UnsupportedModelError("every cached layer is pruned; routefx needs at least one layer with a cache")
    fn, params = _forward_fn(model, layout, kept, decode=True)
    if example is not None:
        return _export(model, fn, params, dict(example), ("decode", tuple(kept), dataclasses.astuple(layout)),
                       layout.recurrent), example
    S = 1 if layout.recurrent or one_token else _S
    ids = _example_ids(model, _B, S)
    example = {"input_ids": ids, "attention_mask": torch.ones(_B, _P + S, dtype=torch.long, device=ids.device),
               "position_ids": torch.arange(_P, _P + S, device=ids.device).expand(_B, S)}
    g = torch.Generator().manual_seed(0)
    for i, name, slot in cache_entries(layout, kept):
        shape, dtype = entry_shape(layout, i, name, slot, _B, _P)
        example["past_" + name] = torch.randn(shape, generator=g).to(device=ids.device, dtype=dtype)
    return _export(model, fn, params, dict(example), ("decode", tuple(kept), dataclasses.astuple(layout)),
                       layout.recurrent), example
