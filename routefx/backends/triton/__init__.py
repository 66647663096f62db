"""Triton GPU backend: the routed FFN as route-sorted grouped GEMM kernels.

- `routing`: routing metadata on the device with no host synchronisation (counting sort by route).
- `kernels`: the `@triton.jit` kernels of the sorted path (gate/up with fused activation, down with fused gate
  and scatter, the one-program routing sort).
- `decode_kernels`: the decode path for T <= 64 tokens (masked dense over the used span, split-K down).
- `ffn`: the checked host wrapper `routed_ffn`, registered as `torch.ops.routefx_triton.routed_ffn`
  (`torch.library.triton_op`, so torch.compile traces it without a graph break). Import it to register the op.

Submodules are imported on demand: importing this package does not import triton.
"""

__all__ = ["decode_kernels", "ffn", "kernels", "routing"]
