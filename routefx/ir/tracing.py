"""How routefx's traces run: torch.export of the model (capture), of generation steps and re-traced decode pieces,
and the ONNX exporter's trace of a lowered graph.

Stack traces are not recorded on the traced graph's nodes (`torch.fx.config.do_not_emit_stack_traces`): one per
node (a captured Python traceback, symbolised) took about a quarter of a tiny model's export (a 3-layer Llama
captured in 2.6 s with them, 1.9 s without, on 2 cores; the compile-heavy test files 10% faster), and routefx reads
no node's stack trace: recognition names what it finds by `nn_module_stack`, and a failed trace raises with
Python's own traceback. At the CPU benchmark's size (8 layers, d=1024) the difference is within noise (capture
2.6 s either way). Set `ROUTEFX_STACK_TRACES=1` to keep them (`gm.print_readable()` then shows the model line
behind each node; an export the capture cache kept is reused as it was traced: `routefx.clear_capture_cache()`).
"""
from __future__ import annotations

import contextlib
import os

try:
    from torch.fx import config as _fx_config
except ImportError:     # a torch without the switch
    _fx_config = None

__all__ = ["tracing"]


@contextlib.contextmanager
def tracing():
    """A trace without node stack traces (unless ROUTEFX_STACK_TRACES=1; a no-op on a torch without the switch)."""
    if (not hasattr(_fx_config, "do_not_emit_stack_traces")
            or os.environ.get("ROUTEFX_STACK_TRACES", "") not in ("", "0")):
        yield
        return
    before = _fx_config.do_not_emit_stack_traces
    _fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        _fx_config.do_not_emit_stack_traces = before
