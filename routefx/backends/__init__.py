"""Backends: eager (reference) and onnx (ONNX Runtime on CPU). Triton comes in a later release.

Each backend module has `prepare(gm, example_kwargs)`, returning a callable run as `run(**kwargs)` with the
output structure of `gm(**kwargs)`. Backends are imported lazily: `onnx` pulls in onnxruntime and onnxscript.
"""
from routefx.errors import BackendError

BACKENDS = ("eager", "onnx")


def get_backend(name: str):
    if name == "eager":
        from routefx.backends import eager
        return eager
    if name == "onnx":
        from routefx.backends import onnx
        return onnx
    raise BackendError(f"backend {name!r} is not available; supported: {', '.join(BACKENDS)}")
