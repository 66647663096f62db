"""One tolerance table for every comparison in the suite (max abs error over non-padding positions, fp32)."""
TRITON_VS_EAGER = 1e-4    # the Triton backend (kernels under TRITON_INTERPRET=1 on CPU, fp32) against eager
# The Triton backend on CUDA in bf16 against the eager backend in bf16 (8 mantissa bits: one ulp is 2^-8 = 0.0039
# at |x| in [0.5, 1); the zoo models' logits stay below 1), both accumulating in fp32 in a different order.
TRITON_BF16_VS_EAGER = 2e-2
EXACT_REWRITE = 1e-5      # a rewrite that keeps the function (Dense, PruneLayers vs the pruned reference)
OP_VS_LOOP = 1e-5         # routed_ffn against the per-token float64 loop, fp32 inputs
ONNX_VS_EAGER = 1e-4      # the ONNX backend (ONNX Runtime, CPU) against the eager backend on the same graph
