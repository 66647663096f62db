"""Generation on compiled models: prefill and decode graphs with an explicit, growing KV cache; the loop;
self-speculative decoding.

`CompiledModel.generate(...)` delegates to `generate` here. See `step` (capture of the cached steps), `graphs` (one
plan for both graphs), `loop` (positions, padding, stopping), `sampling`, `speculative`.
"""
from routefx.generate.loop import GenerationStats, Stepper, generate, generate_with_stats
from routefx.generate.speculative import SpeculativeStats, choose_n, speculative_generate

__all__ = ["generate", "generate_with_stats", "GenerationStats", "Stepper", "speculative_generate",
           "SpeculativeStats", "choose_n"]
