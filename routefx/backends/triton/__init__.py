"""Triton GPU backend: the routed FFN as route-sorted grouped GEMM kernels.

- `routing`: routing metadata on the device with no host synchronisation (counting sort by route).
- `kernels`: the `@triton.jit` kernels (gate/up with fused activation, down with fused gate and scatter).
- `ffn`: the checked host wrapper `routed_ffn`, registered as `torch.ops.routefx_triton.routed_ffn`
  (`torch.library.triton_op`, so torch.compile traces it without a graph break). Import it to register the op.

Submodules are imported on demand: importing this package does not import triton.
"""

__all__ = ["ffn", "kernels", "routing"]
