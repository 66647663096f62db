"""The benchmark LM of the quality study: a Llama-shaped decoder trained here, on text every machine has.

Corpus: the `.py` files of the Python standard library (source and docstrings; `sysconfig.get_paths()['stdlib']`,
without `site-packages`, test suites and idlelib), in sorted path order. A file is held out when the sha256 of its
relative path is 0 mod 10, so the split is by file and does not depend on which other files a Python release ships.

Tokenizer: byte-level BPE trained with the `tokenizers` library on the train split. Model: `LlamaForCausalLM` from
a config (`FULL`: 6 layers, d=256, FFN 704, vocab 4096), AdamW with a fixed seed for a fixed number of steps,
sized to stay within 20 minutes on 2 CPU cores. `QUICK` is a tiny stand-in (about a minute) for cold caches and
tests; `info["label"]` says which one was loaded.

Cache: `$ROUTEFX_CACHE/quality_model[_quick]/` (default `~/.cache/routefx`), a Hugging Face model directory
(config.json, model.safetensors, tokenizer.json) plus `manifest.json` with the training settings, the sha256 of
the weight and tokenizer files, the held-out perplexity and the training time. A later run verifies the checksums
and reuses it; a mismatch retrains (`train_if_missing=True`) or raises `ArtifactError`.

    model, tokenizer, info = load_quality_model()
    ppl = perplexity(model, heldout_batches(tokenizer, n=8, seq_len=256))

Run as a script (`python bench/quality_model.py [--quick] [--retrain]`) to train or verify and print the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time

import torch

from routefx.errors import ArtifactError, CalibrationError

__all__ = ["Settings", "FULL", "QUICK", "load_quality_model", "heldout_batches", "calibration_batches",
           "perplexity", "cache_dir", "stdlib_files", "FORMAT"]

FORMAT = 1
EOS = "<|endoftext|>"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines the trained model (stored in the manifest; a change retrains)."""
    name: str
    vocab: int
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    warmup: int
    seed: int = 0
    max_train_bytes: int | None = None   # None: the whole train split
    heldout_rows: int = 64               # windows of seq_len tokens for the reported perplexity

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads}: hidden must be a "
                             "multiple of heads and heads a multiple of kv_heads")


FULL = Settings("quality_model", vocab=4096, layers=6, hidden=256, ffn=704, heads=4, kv_heads=2, seq_len=256,
                batch=16, steps=500, lr=2e-3, warmup=30)
QUICK = Settings("quality_model_quick", vocab=1024, layers=3, hidden=64, ffn=176, heads=2, kv_heads=1, seq_len=128,
                 batch=16, steps=250, lr=3e-3, warmup=20, max_train_bytes=2_000_000, heldout_rows=32)


# ---------------------------------------------------------------- corpus

def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 10 == 0


def stdlib_files(split: str) -> list[str]:
    """Relative paths (posix) of the stdlib `.py` files in `split` ("train" or "heldout"), sorted."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split {split!r}: supported are 'train' and 'heldout'")
    root, out = _stdlib_root(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for f in filenames:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
                if _heldout(rel) == (split == "heldout"):
                    out.append(rel)
    if not out:
        raise CalibrationError(f"no standard-library .py files found under {root!r} for split {split!r}")
    return sorted(out)


def _texts(split: str, max_bytes: int | None = None) -> list[str]:
    root, out, total = _stdlib_root(), [], 0
    for rel in stdlib_files(split):
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        out.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return out


def _corpus_digest() -> str:
    h = hashlib.sha256()
    for split in ("train", "heldout"):
        for rel in stdlib_files(split):
            h.update(f"{split}:{rel}:{os.path.getsize(os.path.join(_stdlib_root(), rel))}\n".encode())
    return h.hexdigest()


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` under a transformers tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


_STREAMS: dict = {}


def _stream(tokenizer, split: str, max_bytes: int | None = None) -> torch.Tensor:
    """The split's files tokenised and joined with EOS: [N] int64 (memoised per tokenizer and split)."""
    tok = _backend(tokenizer)
    key = (hashlib.sha256(tok.to_str().encode()).hexdigest(), split, max_bytes)
    if key not in _STREAMS:
        eos = tok.token_to_id(EOS)
        ids: list[int] = []
        for enc in tok.encode_batch(_texts(split, max_bytes)):
            ids.extend(enc.ids)
            if eos is not None:
                ids.append(eos)
        _STREAMS[key] = torch.tensor(ids, dtype=torch.long)
    return _STREAMS[key]


def _as_batches(rows: torch.Tensor, batch: int) -> list[dict]:
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows.split(batch)]


def heldout_batches(tokenizer, n: int, seq_len: int, batch: int = 8) -> list[dict]:
    """`n` batches of `batch` consecutive, non-overlapping windows of `seq_len` tokens from the held-out files
    (deterministic: the same windows every call). Each batch: {"input_ids": [batch, seq_len], "attention_mask"}."""
    data = _stream(tokenizer, "heldout")
    need = n * batch * seq_len
    if need > len(data):
        raise CalibrationError(f"{n} held-out batches of {batch} x {seq_len} tokens need {need} tokens; the held-out "
                               f"split has {len(data)} with this tokenizer")
    return _as_batches(data[:need].view(n * batch, seq_len), batch)


CALIBRATION_BYTES = 3_000_000


def calibration_batches(tokenizer, n: int, seq_len: int, batch: int = 8, seed: int = 1234) -> list[dict]:
    """`n` batches of `batch` windows of `seq_len` tokens at seeded random places in the train split (never
    held-out text): its first `CALIBRATION_BYTES` characters, in file order (tokenising all of it takes long)."""
    data = _stream(tokenizer, "train", CALIBRATION_BYTES)
    if len(data) <= seq_len:
        raise CalibrationError(f"windows of {seq_len} tokens do not fit the train split ({len(data)} tokens)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (n * batch,), generator=g)
    return _as_batches(torch.stack([data[s:s + seq_len] for s in starts.tolist()]), batch)


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(mean next-token cross-entropy) over every real (mask 1) position that has a real successor.
    `model(**batch)` may return logits or an object with `.logits` (a HF model, a routefx CompiledModel)."""
    total, count = 0.0, 0
    for b in batches:
        out = model(**b)
        logits = getattr(out, "logits", out)[:, :-1].float()              # [B, S-1, V]
        target, keep = b["input_ids"][:, 1:], (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += nll[keep].double().sum().item()
        count += int(keep.sum())
    return math.exp(total / count)


# ---------------------------------------------------------------- training

def _train_tokenizer(s: Settings):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=s.vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts("train", s.max_train_bytes), trainer)
    return tok


def _wrap_tokenizer(tok):
    import transformers as hf
    return hf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def _config(s: Settings, eos_id: int):
    import transformers as hf
    cfg = hf.LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=max(512, 2 * s.seq_len), bos_token_id=eos_id,
                         eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return cfg


def _train(s: Settings, out: str) -> dict:
    """Train tokenizer and model under `s` into the (empty) directory `out`; returns the manifest."""
    import transformers as hf
    from tqdm import tqdm
    t0 = time.perf_counter()
    print(f"[quality_model] training the BPE tokenizer (vocab {s.vocab}) on the stdlib train split", file=sys.stderr)
    tok = _train_tokenizer(s)
    data = _stream(tok, "train", s.max_train_bytes)
    torch.manual_seed(s.seed)
    model = hf.LlamaForCausalLM(_config(s, tok.token_to_id(EOS)))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)
    cosine = lambda i: min(1.0, (i + 1) / s.warmup) * 0.5 * (1 + math.cos(math.pi * i / s.steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.05, cosine(i)))
    g = torch.Generator().manual_seed(s.seed + 1)
    model.train()
    ema = None
    bar = tqdm(range(s.steps), desc=f"training {s.name} ({len(data):,} train tokens)", unit="step", file=sys.stderr)
    for _ in bar:
        starts = torch.randint(0, len(data) - s.seq_len, (s.batch,), generator=g).tolist()
        ids = torch.stack([data[i:i + s.seq_len] for i in starts])                     # [batch, seq_len]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
    train_seconds = time.perf_counter() - t0
    model.eval()
    wrapped = _wrap_tokenizer(tok)
    ppl = perplexity(model, heldout_batches(wrapped, s.heldout_rows // 8, s.seq_len, batch=8))
    model.save_pretrained(out)
    wrapped.save_pretrained(out)
    import transformers
    manifest = {
        "format": FORMAT, "settings": dataclasses.asdict(s), "quick": s.name == QUICK.name,
        "heldout_perplexity": ppl, "final_train_loss_ema": ema, "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()), "train_tokens_seen": s.steps * s.batch * s.seq_len,
        "train_split_tokens": len(data), "corpus_digest": _corpus_digest(), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "sha256": _checksums(out),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ---------------------------------------------------------------- cache

def cache_dir(quick: bool = False) -> str:
    base = os.environ.get("ROUTEFX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "routefx")
    return os.path.join(base, (QUICK if quick else FULL).name)


def _checksums(path: str) -> dict:
    out = {}
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h = hashlib.sha256()
        with open(os.path.join(path, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def _verify(path: str, s: Settings) -> dict:
    """The manifest of a valid cache at `path`; ArtifactError saying what is wrong otherwise."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no manifest.json (no trained quality model there)") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}/manifest.json is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("settings") != dataclasses.asdict(s):
        raise ArtifactError(f"{path}: trained with format {manifest.get('format')} and settings "
                            f"{manifest.get('settings')}; this code wants format {FORMAT} and {dataclasses.asdict(s)}")
    try:
        found = _checksums(path)
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: missing file {os.path.basename(e.filename)}") from None
    bad = [n for n, h in manifest["sha256"].items() if found.get(n) != h]
    if bad:
        raise ArtifactError(f"{path}: sha256 of {', '.join(bad)} differs from the manifest (modified or truncated)")
    return manifest


@contextlib.contextmanager
def _lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)        # one process trains; the others wait, then load its result
        yield


def load_quality_model(train_if_missing: bool = True, quick: bool = False, retrain: bool = False):
    """The trained benchmark LM: `(model, tokenizer, info)`, from the cache, training it first when the cache is
    missing or invalid and `train_if_missing` (else `ArtifactError`). `quick=True` gives the tiny stand-in.
    `info`: label, quick, path, heldout_perplexity, train_seconds, steps, settings, trained_now, manifest."""
    import transformers as hf
    s = QUICK if quick else FULL
    path = cache_dir(quick)
    trained_now = False
    with _lock(path):
        try:
            if retrain:
                raise ArtifactError(f"{path}: retraining on request")
            manifest = _verify(path, s)
        except ArtifactError as e:
            if not train_if_missing:
                raise
            print(f"[quality_model] {e}; training ({s.steps} steps)", file=sys.stderr)
            tmp = f"{path}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            threads = torch.get_num_threads()
            if quick:                  # its matrices are too small for a second thread to pay (it spin-waits)
                torch.set_num_threads(1)
            try:
                _train(s, tmp)
            finally:
                torch.set_num_threads(threads)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            manifest, trained_now = _verify(path, s), True
    model = hf.LlamaForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tokenizer = hf.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    kind = "QUICK STAND-IN (tiny, ~1 min of training; not the benchmark LM)" if quick else "benchmark LM"
    label = (f"{kind}: Llama {s.layers} layers, d={s.hidden}, FFN {s.ffn}, vocab {s.vocab}, {s.steps} steps; "
             f"held-out perplexity {manifest['heldout_perplexity']:.2f}")
    info = {"label": label, "quick": quick, "path": path, "heldout_perplexity": manifest["heldout_perplexity"],
            "train_seconds": manifest["train_seconds"], "steps": s.steps, "settings": dataclasses.asdict(s),
            "trained_now": trained_now, "manifest": manifest}
    return model, tokenizer, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train (or verify and reuse) the quality-study benchmark LM.")
    p.add_argument("--quick", action="store_true", help="the tiny stand-in instead of the benchmark LM")
    p.add_argument("--retrain", action="store_true", help="train again even when the cache is valid")
    p.add_argument("--no-train", action="store_true", help="fail instead of training when the cache is missing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a shared, busy machine 1 is far faster than 2: no spin-waiting)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, info = load_quality_model(train_if_missing=not a.no_train, quick=a.quick, retrain=a.retrain)
    m = info["manifest"]
    print(info["label"])
    print(f"cache: {info['path']}  ({'trained now' if info['trained_now'] else 'verified and reused'})")
    print(f"parameters {m['parameters']:,}; {m['train_tokens_seen']:,} train tokens seen of {m['train_split_tokens']:,}"
          f"; training took {m['train_seconds']:.0f} s on {m['threads']} threads; final train loss (EMA) "
          f"{m['final_train_loss_ema']:.3f}; held-out perplexity {m['heldout_perplexity']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
