"""`inspect` never returns a wrong block count silently: other signals (attention ops, one attention and one FFN
per block, repeated block structure) are cross-checked and disagreements reported in `ModelIR.notes`."""
import pytest
import torch
from torch import nn

import routefx
from tests.zoo import _RMS, _Attn


class _AttentionOnly(nn.Module):
    """Three attention-only residual branches and one MLP at the end: no FFN marks where blocks 0-2 end. With the
    attentions in a module list (`a.0`, `a.1`, `a.2`) the list does; as three attributes nothing does."""

    def __init__(self, vocab=61, d=24, h=3, as_list=False):
        super().__init__()
        self.e = nn.Embedding(vocab, d)
        self.n = nn.ModuleList([_RMS(d) for _ in range(3)])
        attn = [_Attn(d, h) for _ in range(3)]
        if as_list:
            self.a = nn.ModuleList(attn)
        else:
            self.a0, self.a1, self.a2 = attn
        self.as_list = as_list
        self.f1, self.f2 = nn.Linear(d, 40), nn.Linear(40, d)
        self.o = nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.e(input_ids)
        for n, a in zip(self.n, self.a if self.as_list else (self.a0, self.a1, self.a2)):
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


def test_attention_only_layers_of_a_list_are_blocks_and_reported():
    """The module list names the layers: one block per attention, the MLP with the last, and the blocks without
    an FFN are noted."""
    torch.manual_seed(0)
    ir = routefx.inspect(_AttentionOnly(as_list=True).eval(), (torch.randint(0, 61, (2, 6)),))
    assert [(b.path, len(b.attention), b.ffn is not None) for b in ir.blocks][:2] == [("a.0", 1, False),
                                                                                      ("a.1", 1, False)]
    assert len(ir.blocks) == 3 and len(ir.blocks[2].attention) == 1 and ir.blocks[2].ffn.kind == "mlp"
    assert any("blocks [0, 1] have no FFN branch" in n for n in ir.notes), ir.notes


@pytest.mark.parametrize("name", ["llama", "deepseekv3", "qwen2moe", "plain_resized", "bloom"])
def test_no_notes_when_signals_agree(name, zoo_capture):
    from routefx.ir import recognize
    _, gm = zoo_capture(name)
    assert recognize(gm).notes == []
