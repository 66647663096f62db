"""What `generate` takes from the model's `generation_config` and the caller's keyword arguments.

Hugging Face models: the settings are resolved as Hugging Face `generate` resolves them, with transformers' own
methods (`_prepare_generation_config`: the caller's arguments over the model's `generation_config` over
transformers' global defaults; `_prepare_generated_length`: `max_new_tokens` / `max_length` / `min_new_tokens`
against the prompt length; `_get_logits_processor`: the `LogitsProcessorList` — repetition and n-gram penalties,
forced BOS/EOS, bad words, minimum lengths, suppressed tokens, and with `do_sample` the temperature / top-k /
top-p / min-p / typical warpers). The loop applies that list to the float32 logits of the last position and the
sequence so far, then takes the argmax or one multinomial draw, as `generate` does, so greedy output is
token-identical and sampling draws from the same distribution (the same random stream when `generator` is None
and the global seed is the same).

What changes which tokens come out and routefx does not do is refused by name (`UNSUPPORTED`): beam search,
several sequences per prompt, contrastive search, DoLa, classifier-free guidance, constrained beams, stop strings,
a time limit, assisted / prompt-lookup decoding, token healing, dict outputs. Keyword arguments that are no
generation setting are refused too (`generate` would pass them to the model's forward; routefx's graphs take
input_ids, attention_mask and positions only).

Plain `nn.Module` models (no `generation_config`): greedy, or sampling with `temperature` and `top_k` only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from routefx.errors import InputError
from routefx.generate.sampling import Sampler

__all__ = ["Settings", "resolve", "UNSUPPORTED"]

# setting -> (is it asked for?, what it does): each changes the tokens and has no routefx path
UNSUPPORTED: dict[str, tuple[Callable, str]] = {
    "num_beams": (lambda v: v is not None and v > 1, "beam search"),
    "num_beam_groups": (lambda v: v is not None and v > 1, "group beam search"),
    "num_return_sequences": (lambda v: v is not None and v > 1, "several sequences per prompt"),
    "penalty_alpha": (lambda v: v is not None and v > 0, "contrastive search"),
    "dola_layers": (lambda v: v is not None, "DoLa decoding"),
    "guidance_scale": (lambda v: v is not None and v != 1, "classifier-free guidance"),
    "constraints": (lambda v: v is not None, "constrained beam search"),
    "force_words_ids": (lambda v: v is not None, "constrained beam search"),
    "stop_strings": (lambda v: v is not None, "stopping at strings"),
    "max_time": (lambda v: v is not None, "a time limit"),
    "prompt_lookup_num_tokens": (lambda v: v is not None, "prompt-lookup decoding"),
    "token_healing": (lambda v: bool(v), "token healing"),
    "use_mtp": (lambda v: bool(v), "multi-token-prediction decoding"),
    "return_dict_in_generate": (lambda v: bool(v), "dict outputs (routefx returns the token ids)"),
    "output_scores": (lambda v: bool(v), "returning scores"),
    "output_logits": (lambda v: bool(v), "returning logits"),
}

_PLAIN_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_k", "eos_token_id", "pad_token_id"}


@dataclasses.dataclass
class Settings:
    max_new_tokens: int
    eos: list[int]                     # a row stops at the first of these (empty: never)
    pad: int                           # what a stopped row receives
    process: Callable                  # (seq [B, L] int64, scores [B, V] float32) -> scores [B, V]
    choose: Sampler                    # scores [B, V] -> tokens [B]
    processors: tuple[str, ...] = ()   # class names of the logits processors, in order


def _as_list(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def _identity(seq, scores):
    return scores


def _check_sampling(given) -> None:
    """routefx's refusals of explicit sampling arguments (transformers warns on some, or reads top_k=0 as off)."""
    Sampler(True, given.get("temperature", 1.0), given.get("top_k"))


def resolve(model, ids: torch.Tensor, mask: torch.Tensor, generator=None, logits_processor=None,
            **kwargs) -> Settings:
    """ids, mask: the checked prompt [B, S]; kwargs: `generate`'s keyword arguments (None = not given)."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    _check_sampling(given)
    if given.get("max_new_tokens") == 0:     # transformers refuses 0; routefx returns the prompt
        return dataclasses.replace(resolve(model, ids, mask, generator, logits_processor,
                                           **{**kwargs, "max_new_tokens": 1}), max_new_tokens=0)
    if not _is_hf(model):
        return _plain(model, given, generator, logits_processor)
    try:
        gc, unused = model._prepare_generation_config(None, **given)
    except ValueError as e:
        raise InputError(f"{type(model).__name__}: transformers refuses these generation settings: {e}") from e
    if unused:
        raise InputError(f"unknown generation argument(s) {sorted(unused)}: generate takes the settings of "
                         "transformers' GenerationConfig and routefx's own (streamer, generator, decode_policy, "
                         "logits_processor); model inputs other than input_ids and attention_mask are not taken")
    asked = {k: getattr(gc, k, None) for k, (on, _) in UNSUPPORTED.items() if on(getattr(gc, k, None))}
    if asked:
        what = "; ".join(f"{k}={v!r} ({UNSUPPORTED[k][1]}, from "
                         f"{'the call' if k in given else 'the model generation_config'})" for k, v in asked.items())
        raise InputError(f"generate does not support {what}. Supported: greedy or sampling (num_beams=1), one "
                         "sequence per prompt, with the logits processors of the generation_config (penalties, "
                         "forced/suppressed/bad tokens, minimum lengths, temperature, top-k/top-p/min-p/typical); "
                         "pass the setting's neutral value to override the model's")
    S = ids.shape[1]
    has_default_max = "max_length" not in given and gc.max_length is not None
    has_default_min = "min_length" not in given and gc.min_length is not None
    gc = model._prepare_generated_length(gc, has_default_max, has_default_min, "input_ids", S, ids)
    eos = _as_list(gc.eos_token_id)
    # generate's special-token tensors (`_prepare_special_tokens`), with eos_token_id=[] meaning "no end token"
    gc._eos_token_tensor = torch.tensor(eos, dtype=torch.long, device=ids.device) if eos else None
    pad = _as_list(gc.pad_token_id) or eos[:1] or [0]
    procs = model._get_logits_processor(
        generation_config=gc, input_ids_seq_length=S, encoder_input_ids=ids, prefix_allowed_tokens_fn=None,
        logits_processor=logits_processor if logits_processor is not None else [], device=ids.device,
        model_kwargs={"attention_mask": mask})
    n = max(int(gc.max_length) - S, 0)
    return Settings(n, eos, pad[0], procs if len(procs) else _identity,
                    Sampler(bool(gc.do_sample), 1.0, None, generator), tuple(type(p).__name__ for p in procs))


def _is_hf(model) -> bool:
    return all(hasattr(model, m) for m in ("generation_config", "_prepare_generation_config",
                                          "_prepare_generated_length", "_get_logits_processor"))


def _plain(model, given, generator, logits_processor) -> Settings:
    extra = sorted(set(given) - _PLAIN_KEYS)
    if extra or logits_processor is not None:
        raise InputError(f"{type(model).__name__} has no generation_config (not a Hugging Face generation model): "
                         f"generate takes {sorted(_PLAIN_KEYS)} for it, got {extra or ['logits_processor']}")
    eos = _as_list(given.get("eos_token_id", getattr(getattr(model, "config", None), "eos_token_id", None)))
    pad = _as_list(given.get("pad_token_id", getattr(getattr(model, "config", None), "pad_token_id", None)))
    return Settings(given.get("max_new_tokens", 20), eos, (pad or eos[:1] or [0])[0], _identity,
                    Sampler(bool(given.get("do_sample", False)), given.get("temperature", 1.0), given.get("top_k"),
                            generator))


def artifact_settings(model) -> dict:
    """The generation settings an exported artifact records for `routefx.runtime`'s generate
    (`routefx/runtime/generate.py`, numpy only): the end and pad tokens and the length defaults, the sampling
    defaults of the model's generation_config (do_sample, temperature, top_k, top_p: the warpers the runtime
    applies, in transformers' order), and by name what else the generation_config applies, which the runtime
    refuses rather than ignores ("processors" for every decoding, "sampling_processors" with do_sample)."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    greedy = resolve(model, ids, torch.ones_like(ids), do_sample=False)
    out = {"eos": greedy.eos, "pad": greedy.pad, "processors": list(greedy.processors), "max_length": None,
           "max_new_tokens": greedy.max_new_tokens, "do_sample": False, "temperature": 1.0, "top_k": None,
           "top_p": 1.0, "sampling_processors": []}
    if _is_hf(model):
        gc, _ = model._prepare_generation_config(None)
        out.update(max_length=gc.max_length, max_new_tokens=gc.max_new_tokens, do_sample=bool(gc.do_sample),
                   temperature=float(1.0 if gc.temperature is None else gc.temperature),
                   top_k=None if not gc.top_k else int(gc.top_k),
                   top_p=float(1.0 if gc.top_p is None else gc.top_p))
        sampled = resolve(model, ids, torch.ones_like(ids), do_sample=True)
        own = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"} | set(greedy.processors)
        out["sampling_processors"] = [p for p in sampled.processors if p not in own]
    return out
