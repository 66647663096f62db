"""`inspect` never returns a wrong block count silently: other signals (attention ops, one attention and one FFN
per block, repeated block structure) are cross-checked and disagreements reported in `ModelIR.notes`."""
import pytest
import torch
from torch import nn

import routefx
from tests.zoo import ZOO, _RMS, _Attn


class _AttentionOnly(nn.Module):
    """Three attention-only residual blocks and one MLP at the end: nothing marks where blocks 0-2 end."""

    def __init__(self, vocab=61, d=24, h=3):
        super().__init__()
        self.e = nn.Embedding(vocab, d)
        self.n = nn.ModuleList([_RMS(d) for _ in range(3)])
        self.a = nn.ModuleList([_Attn(d, h) for _ in range(3)])
        self.f1, self.f2 = nn.Linear(d, 40), nn.Linear(40, d)
        self.o = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.e(input_ids)
        for n, a in zip(self.n, self.a):
            x = x + a(n(x))
        x = x + self.f2(torch.relu(self.f1(x)))
        return self.o(x)


def test_attention_only_stack_is_reported():
    torch.manual_seed(0)
    ir = routefx.inspect(_AttentionOnly().eval(), (torch.randint(0, 61, (2, 6)),))
    assert len(ir.blocks) == 1                       # what the residual stream alone says ...
    assert len(ir.blocks[0].attention) == 3
    assert any("hold 3 attention branches" in n for n in ir.notes), ir.notes   # ... and the disagreement
    assert "note: blocks [0] hold 3 attention branches" in str(ir)
    assert ir.to_dict()["notes"] == ir.notes


@pytest.mark.parametrize("name", ["llama", "deepseekv3", "qwen2moe", "plain_resized", "bloom"])
def test_no_notes_when_signals_agree(name, zoo_capture):
    from routefx.ir import recognize
    _, gm = zoo_capture(name)
    assert recognize(gm).notes == []
