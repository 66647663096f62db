"""What the `routefx` command reads: models (a local Hugging Face directory or `package.module:factory`), their
tokenizers, policy specs (`dense`, `prune:0.5`, `duo:0.5`, or a policy JSON file) and token files (plain text,
tokenised with the model's tokenizer, or safetensors of token ids). Everything here raises `CliError` (or
another `RoutefxError`) with one line saying what was found and what is supported.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect as _inspect
import json
import os
import sys

from routefx.errors import RoutefxError

__all__ = ["CliError", "LoadedModel", "load_model", "parse_policy", "read_token_file", "example_batch",
           "copy_tokenizer", "artifact_tokenizer"]


class CliError(RoutefxError, ValueError):
    """A command-line input routefx cannot use: a model path or factory that does not exist, a token file of an
    unknown kind, a policy spec outside the supported forms."""


@dataclasses.dataclass
class LoadedModel:
    model: object                 # torch.nn.Module, in eval mode
    tokenizer: object | None      # a transformers tokenizer or a `tokenizers.Tokenizer`, where one was found
    vocab: int
    source: str                   # what the user gave
    directory: str | None         # the HF model directory (tokenizer files are copied from it)


def _vocab(model) -> int:
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise CliError(f"cannot tell the vocabulary size of {type(model).__name__}: it has neither "
                       "get_input_embeddings() nor config.vocab_size")
    return int(vocab)


def _load_dir(path: str) -> LoadedModel:
    import transformers as hf
    hf.utils.logging.disable_progress_bar()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{path} has no config.json: MODEL must be a local Hugging Face model directory "
                       "(save_pretrained) or package.module:factory")
    cfg = hf.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = getattr(cfg, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    auto = hf.AutoModelForCausalLM if causal else hf.AutoModel
    model = auto.from_pretrained(path, local_files_only=True).eval()
    tok = None
    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = hf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(model, tok, _vocab(model), path, path)


def _load_factory(spec: str) -> LoadedModel:
    import torch
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:      # like `python -m`: factories in the current directory are found
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"MODEL {spec!r}: cannot import module {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"MODEL {spec!r}: module {module_name!r} has no callable {attr!r}")
    made = factory()
    model, tok = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"MODEL {spec!r}: the factory returned {type(model).__name__}; it must return a "
                       "torch.nn.Module (or a (module, tokenizer) pair)")
    return LoadedModel(model.eval(), tok, _vocab(model), spec, None)


def load_model(spec: str) -> LoadedModel:
    """MODEL: a local Hugging Face model directory, or `package.module:factory` (a callable returning an
    nn.Module, or a (module, tokenizer) pair). No network: `local_files_only=True`."""
    if os.path.isdir(spec):
        return _load_dir(spec)
    if ":" in spec and not os.path.exists(spec):
        return _load_factory(spec)
    raise CliError(f"MODEL {spec!r} is neither a local model directory nor package.module:factory")


def parse_policy(spec: str, router: str | None = None, small: str | None = None,
                 small_fraction: float | None = None, seed: int | None = None):
    """`dense`, `prune:KEEP` (PruneLayers(keep=KEEP)), `duo:BUDGET` (Duo(budget=BUDGET, router=...)), or the
    path of a policy JSON file (`Policy.to_json()`)."""
    from routefx.policies import Dense, Duo, PruneLayers, policy_from_json
    if os.path.isfile(spec):
        with open(spec) as f:
            return policy_from_json(f.read())
    name, _, value = spec.partition(":")
    name = name.lower()
    if name == "dense" and not value:
        return Dense()
    try:
        number = float(value)
    except ValueError:
        number = None
    if name == "prune" and number is not None:
        return PruneLayers(keep=number)
    if name == "duo" and number is not None:
        extra = {k: v for k, v in (("router", router), ("small", small), ("small_fraction", small_fraction),
                                   ("seed", seed)) if v is not None}
        return Duo(budget=number, **extra)
    raise CliError(f"policy {spec!r}: supported forms are dense, prune:KEEP (a fraction of blocks kept), "
                   "duo:BUDGET (an FFN compute fraction) or a policy JSON file")


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "backend_tokenizer") or not hasattr(tokenizer, "encode_batch"):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tokenizer.encode(text).ids                     # a bare `tokenizers.Tokenizer`


def read_token_file(path: str, tokenizer, seq: int, batch: int, max_batches: int | None = None) -> list[dict]:
    """Batches {"input_ids": [batch, seq], "attention_mask"} from a token file.

    `.safetensors`: a tensor "input_ids" (or the file's only tensor), int, [N, S] or [N] (then cut into rows of
    `seq`), with an optional "attention_mask" of the same shape. Anything else: UTF-8 text, tokenised with the
    model's tokenizer and cut into non-overlapping windows of `seq` tokens (one shorter window when the text is
    shorter than `seq`)."""
    import torch
    if not os.path.isfile(path):
        raise CliError(f"token file {path!r} does not exist")
    mask = None
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        tensors = load_file(path)
        ids = tensors.get("input_ids", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if ids is None or ids.dtype.is_floating_point or ids.dim() not in (1, 2):
            raise CliError(f"{path}: expected an integer tensor 'input_ids' of shape [N, S] or [N]; found "
                           f"{ {k: (str(v.dtype), list(v.shape)) for k, v in tensors.items()} }")
        ids = ids.long()
        mask = tensors.get("attention_mask")
        if ids.dim() == 1:
            ids, mask = _windows(ids, seq), None
    else:
        if tokenizer is None:
            raise CliError(f"{path} is plain text, but the model has no tokenizer (no tokenizer.json in its "
                           "directory): give token ids as a .safetensors file instead")
        with open(path, encoding="utf-8") as f:
            ids = _windows(torch.tensor(_encode(tokenizer, f.read()), dtype=torch.long), seq)
    if ids.numel() == 0:
        raise CliError(f"{path} holds no tokens")
    mask = torch.ones_like(ids) if mask is None else mask.long()
    out = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(batch), mask.split(batch))]
    return out[:max_batches] if max_batches else out


def _windows(ids, seq: int):
    n = len(ids) // seq
    return ids[:n * seq].view(n, seq) if n else ids.view(1, -1)


def example_batch(model, vocab: int, seq: int, batch: int = 1) -> dict:
    """Seeded random token ids [batch, seq] (+ attention_mask where forward takes one), for capture."""
    import torch
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if "attention_mask" in _inspect.signature(model.forward).parameters:
        x["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return x


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(loaded: LoadedModel, dest: str) -> bool:
    """Put the model's tokenizer under `dest` (for `routefx run --text`); False when there is none."""
    import shutil
    if loaded.directory and os.path.isfile(os.path.join(loaded.directory, "tokenizer.json")):
        os.makedirs(dest, exist_ok=True)
        for f in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(loaded.directory, f)):
                shutil.copy(os.path.join(loaded.directory, f), dest)
        return True
    tok = loaded.tokenizer
    if tok is None:
        return False
    os.makedirs(dest, exist_ok=True)
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(dest)
    else:
        tok.save(os.path.join(dest, "tokenizer.json"))
    return os.path.isfile(os.path.join(dest, "tokenizer.json"))


def artifact_tokenizer(directory: str):
    """The `tokenizers.Tokenizer` stored beside an artifact by `routefx compile` (no transformers, no torch)."""
    path = os.path.join(directory, "tokenizer", "tokenizer.json")
    if not os.path.isfile(path):
        raise CliError(f"{directory} has no tokenizer/tokenizer.json (the model was compiled without one): give "
                       "--ids FILE instead of --text")
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


def read_ids_file(path: str):
    """Token ids for `routefx run --ids`: a .safetensors file ("input_ids" [B, S] or [S]), or a text/JSON file of
    integers (one sequence). Returns an int64 numpy array [B, S]."""
    import numpy as np
    if not os.path.isfile(path):
        raise CliError(f"ids file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        tensors = load_file(path)
        ids = tensors.get("input_ids", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if ids is None or ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
            raise CliError(f"{path}: expected an integer tensor 'input_ids' of shape [B, S] or [S]")
    else:
        with open(path) as f:
            text = f.read()
        try:
            values = json.loads(text) if text.lstrip().startswith("[") else [int(t) for t in text.split()]
        except ValueError:
            raise CliError(f"{path}: expected integers separated by whitespace, a JSON list, or .safetensors"
                           ) from None
        ids = np.asarray(values)
        if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.size == 0:
            raise CliError(f"{path}: expected a non-empty list of integer token ids (or a list of equal lists)")
    ids = ids.astype(np.int64)
    return ids[None] if ids.ndim == 1 else ids
