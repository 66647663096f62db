"""routefx's traces record no node stack traces (a quarter of a tiny model's export), unless asked to."""
import pytest
import torch
from torch import nn
from torch.fx import config as fx_config

from routefx.errors import CaptureError
from routefx.ir import capture


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def _traced_lines(gm) -> list[str]:
    """The stack traces recorded on the graph's nodes that point into this file (the model's code)."""
    return [n.meta["stack_trace"] for n in gm.graph.nodes
            if __file__ in (n.meta.get("stack_trace") or "")]


@pytest.mark.parametrize("keep", ["", "1"])
def test_capture_records_stack_traces_only_when_asked(monkeypatch, keep):
    monkeypatch.setenv("ROUTEFX_STACK_TRACES", keep)
    before = fx_config.do_not_emit_stack_traces
    x = torch.randn(2, 5, 8)
    model = Block()
    model.tag = f"stack traces {keep!r}"      # keyed apart: exported here, not taken from the capture cache
    gm = capture(model, (x,))
    assert fx_config.do_not_emit_stack_traces == before        # the global switch is restored
    lines = _traced_lines(gm)
    if keep:
        assert any("self.down(torch.relu(self.up(x)))" in t for t in lines)
    else:
        assert lines == []
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_the_switch_is_restored_when_the_trace_fails(monkeypatch):
    monkeypatch.delenv("ROUTEFX_STACK_TRACES", raising=False)

    class DataDependent(nn.Module):
        def forward(self, x):
            return x[: int(x.sum() > 0) + 1]        # a length read from the data: export refuses it

    before = fx_config.do_not_emit_stack_traces
    with pytest.raises(CaptureError):
        capture(DataDependent(), (torch.randn(3, 4, 8),))
    assert fx_config.do_not_emit_stack_traces == before
