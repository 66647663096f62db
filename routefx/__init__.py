"""routefx: a compiler for adaptive computation in transformer language models."""
from __future__ import annotations

from routefx.errors import RoutefxError, UnsupportedModelError
from routefx.ir import ModelIR, capture, recognize

__all__ = ["inspect", "ModelIR", "RoutefxError", "UnsupportedModelError"]


def inspect(model, example_inputs, example_kwargs=None) -> ModelIR:
    """Capture `model` on the example inputs and recognise its transformer blocks (the model is not modified)."""
    return recognize(capture(model, example_inputs, example_kwargs))
