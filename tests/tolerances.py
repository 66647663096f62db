"""One tolerance table for every comparison in the suite (max abs error over non-padding positions, fp32 unless
named otherwise). Tests import these names; no tolerance is written inline."""
EXACT_REWRITE = 1e-5      # a rewrite that keeps the function (Dense, PruneLayers vs the pruned reference)
ONNX_VS_EAGER = 1e-4      # the ONNX backend (ONNX Runtime, CPU) against the eager backend on the same graph
OP_VS_LOOP = 2e-5         # routed_ffn (fp32) against the per-token float64 loop (atol and rtol)
OP_VS_LOOP_BF16 = 6e-2    # the same with bf16 inputs (atol and rtol; outputs rounded to bf16)
ACTIVATION = 1e-6         # an activation (fp32) against its closed form in float64; the dense op vs F.linear
MUST_DIFFER = 1e-3        # a change that must show: outputs differ by more than this
TRITON_VS_REF = 1e-5      # Triton routed_ffn kernels (fp32, IEEE dots; CPU interpreter) against the float64 reference
TRITON_BF16_REL = 1e-2    # Triton routed_ffn, bf16 on GPU: ||out - ref|| / ||ref|| against the float64 reference
TRITON_VS_EAGER = 1e-4    # the Triton backend (kernels under TRITON_INTERPRET=1 on CPU, fp32) against eager
# The Triton backend on CUDA in bf16 against the eager backend in bf16 (8 mantissa bits: one ulp is 2^-8 = 0.0039
# at |x| in [0.5, 1); the zoo models' logits stay below 1), both accumulating in fp32 in a different order.
TRITON_BF16_VS_EAGER = 2e-2
# The ONNX backend on an fp16 model against the same model run in fp16 by torch: both round every op to fp16
# (11 mantissa bits: one ulp is 2^-11 = 0.00049 at |x| in [0.5, 1)), in a different order: a few ulps.
ONNX_FP16_VS_EAGER = 4e-3   # atol on the zoo logits (below 1); also rtol where values grow (4 ulps)
# A compiled bf16 / fp16 model (eager backend) against the same model run by torch in that dtype, where the rewrite
# reorders a sum (a raised MoE dispatch adds the experts' outputs in another order, accumulating in fp32): up to four
# bf16 ulps (2^-8 = 0.0039 at |x| in [0.5, 1); the zoo logits stay below 1). Measured 0.002-0.006 on 43 MoE families.
HALF_VS_HF = 1.6e-2
INDUCTOR_VS_EAGER = 1e-4  # the inductor backend (torch.compile of the rewritten graph, CPU) against eager
