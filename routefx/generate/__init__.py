"""Generation on compiled models: prefill and decode graphs with an explicit, growing KV cache (and the fixed-shape
states of recurrent layers: Mamba, the hybrids); the loop;
self-speculative decoding; decode-time layer-skip policies (`decode_policies`, run by `skipping` on the decode
graph cut into per-layer pieces by `split`).

`CompiledModel.generate(...)` delegates to `generate` here. See `step` (capture of the cached steps), `graphs` (one
plan for both graphs), `loop` (positions, padding, stopping), `sampling`, `speculative`.
"""
from routefx.generate.decode_policies import (ActivationSkip, DecodePolicy, DepthDecay, LayerSubset,
                                              decode_policy_from_dict, decode_policy_from_json)
from routefx.generate.loop import GenerationStats, Stepper, generate, generate_with_stats
from routefx.generate.skipping import fit_threshold
from routefx.generate.speculative import SpeculativeStats, choose_n, speculative_generate

__all__ = ["generate", "generate_with_stats", "GenerationStats", "Stepper", "speculative_generate",
           "SpeculativeStats", "choose_n", "DecodePolicy", "DepthDecay", "ActivationSkip", "LayerSubset",
           "decode_policy_from_dict", "decode_policy_from_json", "fit_threshold"]
