"""Compile time with and without a kept export (routefx/ir/capture_cache.py), on the CPU benchmark's model.

Model: bench/cpu.py's shape A (a `LlamaForCausalLM`, 8 layers, hidden 1024, FFN 2816, 16 / 4 heads, vocab 32000,
random weights, fp32), example input [1, 512]. Dense, eager backend (the compile without lowering to another
engine), timed four times in one process:

  first                 nothing kept: torch.export runs (and the process's one-time warm-up: imports, first trace)
  same model again      the same model object compiled again (another policy or backend would reuse it the same way)
  built again           a second model built the same way with other weights: the kept export, bound to its tensors
  after clear           `routefx.clear_capture_cache()` first: torch.export runs again, in a warm process (the
                        fair reference for the two compiles that reuse the export)

and the logits of the third compile against its own model's (max |diff|, 0 expected). Usage:
    python bench/capture_reuse.py
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    sys.path.insert(0, HERE)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import routefx
    from artifact import cpu_name
    from routefx.policies import Dense

    torch.set_num_threads(2)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000)
    ids = torch.randint(0, 32000, (1, 512), generator=torch.Generator().manual_seed(0))
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, 2 threads")

    def timed(model, what):
        t = time.perf_counter()
        cm = routefx.compile(model, Dense(), example_inputs=(ids,))
        wall = time.perf_counter() - t
        print(f"  {what:20s} compile {wall:6.2f} s, of which capture {cm.report.capture_seconds:6.2f} s")
        return cm, wall

    routefx.clear_capture_cache()
    torch.manual_seed(0)
    first_model = LlamaForCausalLM(cfg).eval()
    _, first = timed(first_model, "first")
    timed(first_model, "same model again")
    torch.manual_seed(1)
    second_model = LlamaForCausalLM(cfg).eval()
    cm, again = timed(second_model, "built again")
    with torch.no_grad():
        diff = (cm(ids).logits - second_model(ids, use_cache=False).logits).abs().max().item()
    routefx.clear_capture_cache()
    _, cleared = timed(second_model, "after clear")
    print(f"built again: {cleared / again:.2f}x faster to compile than after clear ({first / again:.2f}x than the "
          f"first compile); max |diff| vs its own model {diff:.1e}")


if __name__ == "__main__":
    main()
