"""Backends: eager (reference), onnx (ONNX Runtime on CPU), triton (Triton kernels + Inductor on CUDA), inductor
(torch.compile on the rewritten graph) and auto (times eager, onnx and inductor on the example, keeps the fastest).

Each backend module has `prepare(gm, example_kwargs)`, returning a callable run as `run(**kwargs)` with the
output structure of `gm(**kwargs)`. Backends are imported lazily: `onnx` pulls in onnxruntime and onnxscript,
`triton` pulls in triton (and needs a CUDA GPU, or TRITON_INTERPRET=1 for CPU tests).
"""
import functools
import inspect
import types

from routefx.errors import BackendError

BACKENDS = ("eager", "onnx", "triton", "inductor", "auto")


def get_backend(name: str):
    if name == "eager":
        from routefx.backends import eager
        return eager
    if name == "onnx":
        from routefx.backends import onnx
        return onnx
    if name == "triton":
        from routefx.backends.triton import backend
        reason = backend.unavailable_reason()
        if reason is not None:
            raise BackendError(reason)
        return backend
    if name == "inductor":
        from routefx.backends import inductor
        return inductor
    if name == "auto":
        from routefx.backends import auto
        return auto
    raise BackendError(f"backend {name!r} is not available; supported: {', '.join(BACKENDS)}")


def configure(name: str, options: dict | None = None):
    """Backend `name` with its `prepare` bound to `options` (keyword options of that backend's `prepare`, e.g.
    `{"cudagraphs": True}` for triton). Returns the backend module itself when there are no options. Raises
    `BackendError` naming the options the backend accepts when one is unknown."""
    backend = get_backend(name)
    if not options:
        return backend
    params = inspect.signature(backend.prepare).parameters
    accepted = sorted(k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BackendError(f"backend {name!r} has no option(s) {unknown}; its options are "
                           f"{accepted if accepted else 'none'}")
    return types.SimpleNamespace(__name__=backend.__name__, prepare=functools.partial(backend.prepare, **options))
