"""Typed errors. Each says what was found and what is supported."""


class RoutefxError(Exception):
    """Base class of every error routefx raises on purpose."""


class UnsupportedModelError(RoutefxError, ValueError):
    """The model has no structure routefx can compile (no transformer blocks, an unknown layout)."""


class NoBlocksError(UnsupportedModelError):
    """The graph holds no transformer block routefx recognises (policy Dense compiles such a model as captured)."""


class CaptureError(RoutefxError, RuntimeError):
    """torch.export could not capture the model with dynamic batch and sequence dimensions."""


class NotCompiledError(RoutefxError, RuntimeError):
    """A compiled model asked for its graph, plan, report or artifact before a call compiled it (`routefx.compile`
    without example inputs compiles on the first call)."""


class UnsupportedActivationError(RoutefxError, ValueError):
    """An activation name that is not in `routefx.ir.activations.ACTIVATIONS`."""


class RoutedFFNError(RoutefxError, ValueError):
    """Inputs to `routefx::routed_ffn` that break its contract (shapes, dtypes, ranges, route ids)."""


class PolicyError(RoutefxError, ValueError):
    """A policy with an unknown field, an out-of-range value, or a JSON form that cannot be read."""


class CalibrationError(RoutefxError, ValueError):
    """Calibration data that is missing, empty, or not a re-iterable sequence of batches."""


class InputError(RoutefxError, TypeError):
    """A call whose inputs the compiled model cannot take: wrong dtype or rank, token ids outside the vocabulary,
    a mask that disagrees with the ids, an empty batch or sequence."""


class BackendError(RoutefxError, ValueError):
    """An unknown or unavailable backend."""


class PlanFormatError(RoutefxError, ValueError):
    """A plan directory that is missing, truncated, edited or of an unknown version."""


class PlanMismatchError(RoutefxError, ValueError):
    """A plan applied to a model other than the one it was calibrated on."""


class ArtifactError(RoutefxError, ValueError):
    """An exported artifact that is missing a file, has a modified or truncated file, or a newer format."""


class ExportError(RoutefxError, ValueError):
    """`routefx.export` cannot write this compiled model as an artifact (what was found, what is supported)."""
