"""A tiny Llama trained locally (seconds, CPU) on text every machine has: Python's own standard library source.

Random-weight models have no easy and hard tokens, so quality comparisons between routers use this model.
Byte-level tokens (vocab 256); deterministic for a given seed and torch version.
"""
from __future__ import annotations

import fcntl
import functools
import os
import sysconfig

import torch
import transformers as hf

_FILES = ("textwrap.py", "argparse.py", "difflib.py", "inspect.py", "typing.py", "dataclasses.py", "pathlib.py",
          "functools.py", "collections/__init__.py", "email/message.py")


@functools.lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    root = sysconfig.get_paths()["stdlib"]
    data = b"".join(open(os.path.join(root, f), "rb").read() for f in _FILES if os.path.exists(os.path.join(root, f)))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(n: int, batch: int, seq: int, seed: int, split: str = "train", pad: int = 0) -> list[dict]:
    """`n` batches of byte windows; the train split is the first 90% of the corpus, held-out the rest.
    Row 0 of each batch is left-padded by `pad` positions (token 0, mask 0)."""
    data = corpus()
    cut = int(0.9 * len(data))
    lo, hi = (0, cut) if split == "train" else (cut, len(data))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(lo, hi - seq - 1, (batch,), generator=g)
        ids = torch.stack([data[s:s + seq] for s in starts.tolist()])
        mask = torch.ones_like(ids)
        if pad:
            ids[0] = torch.cat([torch.zeros(pad, dtype=torch.long), ids[0, :seq - pad]])
            mask[0, :pad] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


_CACHE = os.path.join(os.path.dirname(__file__), ".cache")


@functools.lru_cache(maxsize=None)
def trained_llama(steps: int = 200, d: int = 64, layers: int = 4, ffn: int = 172, seed: int = 0):
    """A Llama trained for `steps` AdamW steps on the train split (batch 16 x 64 bytes); cached on disk
    (tests/.cache) so test processes and reruns train it once."""
    from safetensors.torch import load_file
    torch.manual_seed(seed)
    cfg = hf.LlamaConfig(vocab_size=256, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    model = hf.LlamaForCausalLM(cfg)
    path = os.path.join(_CACHE, f"llama-{steps}-{d}-{layers}-{ffn}-{seed}-torch{torch.__version__}.safetensors")
    os.makedirs(_CACHE, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one test process trains, the others wait and load
        if not os.path.exists(path):
            _train(model, steps, seed, path)
    model.load_state_dict(load_file(path), strict=False)
    model.tie_weights()
    return model.eval()


def _train(model, steps: int, seed: int, path: str) -> None:
    from safetensors.torch import save_file
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for b in batches(steps, 16, 64, seed=seed + 1):
        loss = model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, tmp)
    os.replace(tmp, path)
