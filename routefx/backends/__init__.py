"""Backends: eager (reference). ONNX and Triton come in later releases."""
from routefx.errors import BackendError

BACKENDS = ("eager",)


def get_backend(name: str):
    if name == "eager":
        from routefx.backends import eager
        return eager
    raise BackendError(f"backend {name!r} is not available; supported: {', '.join(BACKENDS)}")
