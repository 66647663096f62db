"""routefx demo: capture a Llama-shaped model, show what recognition finds."""
from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

import routefx  # noqa: E402


def llama(layers=4, d=256, ffn=688, vocab=1000):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def main():
    model = llama()
    ids = torch.randint(0, 1000, (2, 64))
    ir = routefx.inspect(model, (ids,), {"attention_mask": torch.ones_like(ids)})
    print(ir)


if __name__ == "__main__":
    main()
