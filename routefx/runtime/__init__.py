"""The lightweight runtime: load an artifact written by `routefx.export` and run it with numpy and onnxruntime
alone (this package imports neither torch nor routefx's compiler)."""
from routefx.runtime.artifact import verify
from routefx.runtime.session import Output, Session, load

__all__ = ["Session", "load", "Output", "verify"]
