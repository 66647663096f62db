"""routefx: a compiler for adaptive computation in transformer language models.

The compiler's names (`compile`, `export`, `policies`, ...) load on first use, so that `routefx.runtime` (and
`routefx.load`) work where only numpy and onnxruntime are installed: importing `routefx` imports no torch.
"""
from __future__ import annotations

import importlib

from routefx.errors import (ArtifactError, BackendError, CalibrationError, CaptureError, ExportError, InputError,
                            NoBlocksError, NotCompiledError, PlanFormatError, PlanMismatchError, PolicyError,
                            RoutefxError, UnsupportedModelError)

__all__ = ["inspect", "compile", "export", "load", "CompiledModel", "Plan", "PlanFormatError", "PlanMismatchError",
           "policies", "ModelIR", "RoutefxError", "UnsupportedModelError", "NoBlocksError", "CaptureError", "PolicyError",
           "CalibrationError", "InputError", "BackendError", "ArtifactError", "ExportError", "NotCompiledError",
           "runtime", "clear_capture_cache"]

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "policies": ("routefx.policies", None),
    "runtime": ("routefx.runtime", None),
    "compile": ("routefx.compiler.compile", "compile"),
    "CompiledModel": ("routefx.compiler.compile", "CompiledModel"),
    "Plan": ("routefx.compiler.plan", "Plan"),
    "export": ("routefx.compiler.export", "export"),
    "load": ("routefx.runtime.session", "load"),
    "ModelIR": ("routefx.ir.model_ir", "ModelIR"),
    "capture": ("routefx.ir.capture", "capture"),
    "recognize": ("routefx.ir.recognize", "recognize"),
    "clear_capture_cache": ("routefx.ir.capture_cache", "clear"),
}


_SUBPACKAGES = ("ir", "calibrate", "passes", "compiler", "backends", "timing")


def __getattr__(name: str):
    if name in _SUBPACKAGES:                 # `import routefx; routefx.ir.capture(...)` as before
        _LAZY[name] = (f"routefx.{name}", None)
    if name not in _LAZY:
        raise AttributeError(f"module 'routefx' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def inspect(model, example_inputs, example_kwargs=None):
    """Capture `model` on the example inputs and recognise its transformer blocks (the model is not modified)."""
    from routefx.ir import capture, recognize
    return recognize(capture(model, example_inputs, example_kwargs))
