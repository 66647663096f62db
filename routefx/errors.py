"""Typed errors. Each says what was found and what is supported."""


class RoutefxError(Exception):
    """Base class of every error routefx raises on purpose."""


class UnsupportedModelError(RoutefxError, ValueError):
    """The model has no structure routefx can compile (no transformer blocks, an unknown layout)."""


class CaptureError(RoutefxError, RuntimeError):
    """torch.export could not capture the model with dynamic batch and sequence dimensions."""


class UnsupportedActivationError(RoutefxError, ValueError):
    """An activation name that is not in `routefx.ir.activations.ACTIVATIONS`."""


class RoutedFFNError(RoutefxError, ValueError):
    """Inputs to `routefx::routed_ffn` that break its contract (shapes, dtypes, ranges, route ids)."""
