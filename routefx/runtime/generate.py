"""`Session.generate`: token generation from an artifact exported with `routefx.export(cm, path, generate=True)`,
with numpy and onnxruntime alone.

The artifact holds the compiled model's prefill and decode graphs (`routefx.generate.graphs`: the same plan as
the forward graph, so Duo routes and pruned layers decode as in the compiled model) and the generation settings
of the model's `generation_config` (manifest "generation"). The loop is `routefx.generate.loop`'s: prefill once,
then one decode step per new token with a growing KV cache; left padding (positions: the count of real tokens
minus one, 0 at padding), a row stops at its first end token and then receives the pad token, the loop ends when
every row has stopped or `max_new_tokens` were generated. Greedy decoding takes the argmax of the float32 logits
(token-identical to the compiled model's `generate` and so to Hugging Face `generate`); sampling applies
temperature, top-k and top-p in transformers' order and draws from a numpy Generator (`seed`): the same
distribution as `generate`, not the same random stream. What else the model's generation_config applies
(repetition penalties, minimum lengths, forced or suppressed tokens, min-p, ...) is refused by name, not ignored:
those models generate in process (`routefx.compile(model, policy).generate`).
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from routefx.errors import ArtifactError, InputError
from routefx.runtime.size_guards import SizeGuards

__all__ = ["Generator"]


class Generator:
    """The prefill and decode sessions of an artifact (opened on first use by `Session.generate`)."""

    def __init__(self, path: str, manifest: dict, options):
        gen = manifest.get("generation")
        if gen is None:
            raise ArtifactError(f"{path} was exported without generation graphs: export it with "
                                "routefx.export(compiled, path, generate=True) to generate from the artifact")
        self.settings = gen
        self.guards = {key: SizeGuards(gen[key].get("guards")) for key in ("prefill", "decode")}
        self.vocab = next((t["vocab"] for t in manifest["inputs"]["tensors"] if t["name"] == "input_ids"), None)
        self.sessions = {}
        for key in ("prefill", "decode"):
            spec = gen[key]
            try:
                self.sessions[key] = ort.InferenceSession(os.path.join(path, spec["file"]),
                                                          sess_options=options(spec["routed"]),
                                                          providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own pybind types
                raise ArtifactError(f"ONNX Runtime {ort.__version__} cannot load {spec['file']} of {path}: "
                                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                    ) from e

    def __call__(self, ids: np.ndarray, mask: np.ndarray | None, *, max_new_tokens=None, do_sample=None,
                 temperature=None, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None,
                 seed=None) -> np.ndarray:
        s = self.settings
        ids, mask = _check(ids, mask, self.vocab)
        do_sample = s["do_sample"] if do_sample is None else bool(do_sample)
        refused = s["processors"] + (s["sampling_processors"] if do_sample else [])
        if refused:
            raise InputError(f"the model's generation_config applies {refused}, which the artifact runtime does not "
                             "(it applies temperature, top-k and top-p): generate in process with "
                             "routefx.compile(model, policy).generate, or set the model's generation_config to "
                             "the settings' neutral values before export")
        n = _max_new(s, ids.shape[1], max_new_tokens)
        eos = _as_list(s["eos"] if eos_token_id is None else eos_token_id)
        pad = int(s["pad"] if pad_token_id is None else pad_token_id)
        choose = _Sampler(do_sample, s["temperature"] if temperature is None else temperature,
                          s["top_k"] if top_k is None else top_k, s["top_p"] if top_p is None else top_p, seed)
        if n == 0:
            return ids
        B = ids.shape[0]
        pos = np.where(mask == 0, 0, np.cumsum(mask, axis=1) - 1)
        out = self._run("prefill", {"input_ids": ids, "attention_mask": mask, "position_ids": pos})
        logits, past, pos = out[0][:, -1], out[1:], pos[:, -1:]
        unfinished = np.ones(B, dtype=bool)
        seq = [ids]
        names = self.settings["past"]
        for step in range(1, n + 1):
            nxt = np.where(unfinished, choose(logits.astype(np.float32)), pad)
            seq.append(nxt[:, None])
            if eos:
                unfinished &= ~np.isin(nxt, eos)
            if step == n or not unfinished.any():
                break
            mask = np.concatenate([mask, np.ones((B, 1), dtype=mask.dtype)], axis=1)
            pos = pos + 1
            feeds = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": pos, **dict(zip(names, past))}
            out = self._run("decode", feeds)
            logits, past = out[0][:, -1], out[1:]
        return np.concatenate(seq, axis=1)

    def _run(self, key: str, feeds: dict) -> list:
        """One run of the prefill or decode graph on the feeds it takes (a graph whose model ignores an input,
        e.g. positions, was exported without it), within the sizes it holds for."""
        self.guards[key].require(feeds, f"{key} graph", "Generate in process (routefx captures again for such sizes)")
        return self.sessions[key].run(None, {n: feeds[n] for n in self.settings[key]["inputs"]})


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(v)] if isinstance(v, (int, np.integer)) else [int(x) for x in v]


def _check(ids, mask, vocab) -> tuple[np.ndarray, np.ndarray]:
    """The prompt as the forward call takes it (`session._as_integral`, `session._check_ids`), plus generate's own
    rules: 0/1 mask with a real token per row, left padding only."""
    from routefx.runtime.session import _as_integral, _check_ids
    if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype.kind not in "iu" or 0 in ids.shape:
        raise InputError(f"input_ids must be a non-empty [batch, seq] integer array, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {list(getattr(ids, 'shape', []))}")
    ids = _as_integral("input_ids", ids, "int64", ids=True)
    if vocab is not None:
        _check_ids("input_ids", ids, vocab)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)}; input_ids has {list(ids.shape)}")
    mask = _as_integral("attention_mask", mask, "int64", ids=False)
    if mask.dtype != np.int64 or not np.isin(mask, (0, 1)).all() or (mask.sum(1) == 0).any():
        raise InputError("attention_mask must hold 0/1 with at least one 1 per row")
    if (np.maximum.accumulate(mask, axis=1) != mask).any():
        raise InputError("attention_mask has padding after a real token; generate takes left padding only")
    return np.ascontiguousarray(ids), np.ascontiguousarray(mask)


def _max_new(s: dict, prompt: int, given) -> int:
    """`max_new_tokens` as given, else the generation_config's, else what its `max_length` leaves after the
    prompt (transformers' rule)."""
    if given is not None:
        if not isinstance(given, (int, np.integer)) or given < 0:
            raise InputError(f"max_new_tokens must be None or an int >= 0, got {given!r}")
        return int(given)
    if s.get("max_new_tokens") is not None:
        return int(s["max_new_tokens"])
    return max(int(s.get("max_length") or 20) - prompt, 0)


class _Sampler:
    """Greedy (argmax), or temperature, top-k, top-p and one draw per row (transformers' warper order)."""

    def __init__(self, do_sample: bool, temperature, top_k, top_p, seed):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise InputError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
            raise InputError(f"top_k must be None or an int >= 0 (0: off), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise InputError(f"top_p must be a number in (0, 1], got {top_p!r}")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, float(temperature), top_k, float(top_p)
        self.rng = np.random.default_rng(seed)

    def warp(self, logits: np.ndarray) -> np.ndarray:
        """The sampling scores: temperature, then top-k and top-p (filtered tokens at -inf)."""
        scores = logits / self.temperature if self.temperature != 1.0 else logits.copy()
        V = scores.shape[-1]
        if self.top_k and self.top_k < V:
            kth = -np.partition(-scores, self.top_k - 1, axis=-1)[:, self.top_k - 1:self.top_k]
            scores[scores < kth] = -np.inf
        if self.top_p < 1.0:
            order = np.argsort(scores, axis=-1, kind="stable")              # ascending, as transformers' TopP
            ranked = np.take_along_axis(scores, order, axis=-1)
            drop = np.cumsum(_softmax(ranked), axis=-1) <= 1 - self.top_p
            drop[:, -1] = False                                             # keep at least one token
            np.put_along_axis(scores, order, np.where(drop, -np.inf, ranked), axis=-1)
        return scores

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if not self.do_sample:
            return logits.argmax(axis=-1)
        cum = np.cumsum(_softmax(self.warp(logits)), axis=-1)
        u = self.rng.random((cum.shape[0], 1)) * cum[:, -1:]               # the first token whose mass covers u
        return (cum < u).sum(axis=-1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
