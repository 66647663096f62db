"""routefx: a compiler for adaptive computation in transformer language models."""
from __future__ import annotations

from routefx import policies
from routefx.compiler.compile import CompiledModel, compile
from routefx.compiler.plan import Plan
from routefx.errors import (BackendError, CalibrationError, CaptureError, InputError, PlanFormatError,
                            PlanMismatchError, PolicyError, RoutefxError, UnsupportedModelError)
from routefx.ir import ModelIR, capture, recognize

__all__ = ["inspect", "compile", "CompiledModel", "Plan", "PlanFormatError", "PlanMismatchError", "policies", "ModelIR", "RoutefxError", "UnsupportedModelError",
           "CaptureError", "PolicyError", "CalibrationError", "InputError", "BackendError"]


def inspect(model, example_inputs, example_kwargs=None) -> ModelIR:
    """Capture `model` on the example inputs and recognise its transformer blocks (the model is not modified)."""
    return recognize(capture(model, example_inputs, example_kwargs))
