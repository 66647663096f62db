"""Generation on compiled models: prefill and decode graphs with an explicit, growing KV cache; the loop.

`CompiledModel.generate(...)` delegates to `generate` here. See `step` (capture), `graphs` (one plan for both
graphs), `loop` (positions, padding, stopping), `sampling`.
"""
from routefx.generate.loop import GenerationStats, generate, generate_with_stats

__all__ = ["generate", "generate_with_stats", "GenerationStats"]
