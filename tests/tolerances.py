"""One tolerance table for every comparison in the suite (max abs error over non-padding positions, fp32)."""
EXACT_REWRITE = 1e-5      # a rewrite that keeps the function (Dense, PruneLayers vs the pruned reference)
OP_VS_LOOP = 1e-5         # routed_ffn against the per-token float64 loop, fp32 inputs
ONNX_VS_EAGER = 1e-4      # the ONNX backend (ONNX Runtime, CPU) against the eager backend on the same graph
TRITON_VS_REF = 1e-5      # Triton routed_ffn kernels (fp32, IEEE dots; CPU interpreter) against the float64 reference
TRITON_BF16_REL = 1e-2    # Triton routed_ffn, bf16 on GPU: ||out - ref|| / ||ref|| against the float64 reference
