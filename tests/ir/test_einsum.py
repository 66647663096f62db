"""Models written with `torch.einsum` (research code's usual form, XLNet, ProphetNet): attention whose scores and
weighted sums are einsums reads as attention, FFN products that are per-token linear maps read as weight products,
FLOPs are counted for every einsum (torch's FlopCounterMode as the reference), and every policy compiles."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import routefx
from routefx.ir import capture
from routefx.ir import flops as flops_mod
from routefx.policies import Dense, Duo, PruneLayers
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER

VOCAB, D, H, FF, LAYERS = 97, 32, 4, 64, 3

# how the FFN's three products are written: (equation, weights stored [out, in]) or F.linear
FFN_FORMS = {"linear": None, "bsd,fd->bsf": True, "...d,df->...f": False}


class _Block(nn.Module):
    def __init__(self, g, ffn: str):
        super().__init__()
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=g) * 0.2)  # noqa: E731
        e = D // H
        self.n1, self.n2 = nn.Parameter(torch.ones(D)), nn.Parameter(torch.ones(D))
        self.wq, self.wk, self.wv, self.wo = r(D, H, e), r(D, H, e), r(D, H, e), r(H, e, D)
        self.ffn = ffn
        out_in = FFN_FORMS[ffn] is not False
        self.up, self.gate = (r(FF, D), r(FF, D)) if out_in else (r(D, FF), r(D, FF))
        self.down = r(D, FF) if out_in else r(FF, D)

    @staticmethod
    def _norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def _product(self, x, w):
        if self.ffn == "linear":
            return F.linear(x, w)
        data, weight = self.ffn.split("->")[0].split(",")
        out = self.ffn.split("->")[1]
        return torch.einsum(f"{data},{weight}->{out}", x, w)

    def forward(self, x, mask):
        h = self._norm(x, self.n1)
        q, k, v = (torch.einsum("bsd,dhe->bhse", h, w) for w in (self.wq, self.wk, self.wv))
        s = torch.einsum("bhie,bhje->bhij", q, k) / math.sqrt(q.shape[-1])
        a = torch.einsum("bhij,bhje->bhie", s.masked_fill(~mask, float("-inf")).softmax(-1), v)
        x = x + torch.einsum("bhse,hed->bsd", a, self.wo)
        h = self._norm(x, self.n2)
        return x + self._product(F.silu(self._product(h, self.gate)) * self._product(h, self.up), self.down)


class EinsumLM(nn.Module):
    """A causal LM whose attention, its projections and the LM head are einsums; the FFN as `ffn` says."""

    def __init__(self, ffn="linear", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(VOCAB, D, generator=g))
        self.layers = nn.ModuleList(_Block(g, ffn) for _ in range(LAYERS))
        self.head = nn.Parameter(torch.randn(VOCAB, D, generator=g) * 0.2)

    def forward(self, input_ids):
        S = input_ids.shape[1]
        mask = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
        x = self.emb[input_ids]
        for layer in self.layers:
            x = layer(x, mask)
        return torch.einsum("bsd,vd->bsv", x, self.head)


def _ids(batch=2, seq=11, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _torch_flops_per_token(model, ids) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    return fc.get_total_flops() / ids.numel()


@pytest.mark.parametrize("ffn", list(FFN_FORMS))
def test_einsum_model_reads_as_transformer_blocks(ffn):
    ir = routefx.inspect(EinsumLM(ffn).eval(), (_ids(),))
    assert len(ir.blocks) == LAYERS and ir.hidden_size == D
    for b in ir.blocks:
        assert b.form == "pre_norm"
        assert [(a.op, a.pattern) for a in b.attention] == [("eager", "causal")]
        assert (b.ffn.kind, b.ffn.activation, b.ffn.hidden_size, b.ffn.intermediate_size) == ("gated", "silu", D, FF)


@pytest.mark.parametrize("ffn", list(FFN_FORMS))
def test_einsum_flops_equal_torchs_count(ffn):
    """Every product here is an einsum or a linear: torch's counter (which sees the products einsum runs) is the
    whole reference (eager attention is counted over all S x S scores by both)."""
    model, ids = EinsumLM(ffn).eval(), _ids()
    cm = routefx.compile(model, Dense(), example_inputs=(ids,))
    assert cm.report.flops_per_token["before"] == pytest.approx(_torch_flops_per_token(model, ids), rel=1e-9)


@pytest.mark.parametrize("equation,shapes", [
    ("bsh,hnd->bsnd", [(2, 5, 8), (8, 4, 3)]),
    ("bnij,bnjd->bnid", [(2, 4, 5, 5), (2, 4, 5, 3)]),
    ("...h,fh->...f", [(2, 5, 8), (6, 8)]),
    ("...ij,...jk->...ik", [(2, 1, 5, 8), (4, 8, 3)]),       # broadcast batch dims
    ("bsh,bsh->bs", [(2, 5, 8), (2, 5, 8)]),
    ("bij,bjk,bkl->bil", [(2, 5, 6), (2, 6, 7), (2, 7, 3)]),
    ("bij,bjk->bk", [(2, 5, 6), (2, 6, 7)]),                 # i summed in one operand alone first
    ("bij,bjk", [(2, 5, 6), (2, 6, 7)]),                     # implicit output 'ik'
])
def test_einsum_flops_of_one_product(equation, shapes):
    tensors = [torch.randn(s) for s in shapes]

    class One(nn.Module):
        def forward(self, x):
            return torch.einsum(equation, x, *tensors[1:])

    gm = capture(One(), (tensors[0],))
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.einsum.default)
    counted = flops_mod._einsum_flops(node, flops_mod._batch_seq(gm)).subs(
        {flops_mod._B: shapes[0][0], flops_mod.S: shapes[0][1]})
    with FlopCounterMode(display=False) as fc:
        torch.einsum(equation, *tensors)
    assert int(counted) == fc.get_total_flops()


@pytest.mark.parametrize("ffn", list(FFN_FORMS))
@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_every_policy_compiles_an_einsum_model(ffn, backend):
    model, ids = EinsumLM(ffn).eval(), _ids()
    other = _ids(3, 7, seed=1)
    tol = EXACT_REWRITE if backend == "eager" else ONNX_VS_EAGER
    with torch.no_grad():
        refs = [model(x) for x in (ids, other)]
    dense = routefx.compile(model, Dense(), example_inputs=(ids,), backend=backend)
    assert dense.report.pass_report("raise_ffn").rewrites == LAYERS
    for x, ref in zip((ids, other), refs):
        torch.testing.assert_close(dense(x), ref, atol=tol, rtol=tol)

    pruned_ref = copy.deepcopy(model)
    del pruned_ref.layers[1]
    pruned = routefx.compile(model, PruneLayers(layers=[1]), example_inputs=(ids,), backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(pruned(other), pruned_ref(other), atol=tol, rtol=tol)

    cal = [_ids(4, 16, seed=10 + i) for i in range(3)]
    duo = routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=cal, example_inputs=(ids,))
    assert duo.report.pass_report("insert_routers").rewrites == LAYERS
    assert abs(duo.plan.budget.realised - 0.5) <= 0.02
    if backend == "onnx":
        on_onnx = routefx.compile(model, duo.plan, example_inputs=(ids,), backend="onnx")
        torch.testing.assert_close(on_onnx(other), duo(other), atol=ONNX_VS_EAGER, rtol=ONNX_VS_EAGER)


def test_an_einsum_that_is_not_a_per_token_linear_map_is_not_read_as_an_ffn_product():
    """'bsd,fd->bfs' puts the FFN's features before the positions: not the data's per-token map, so the FFN is
    not read (with the einsum named), and Duo refuses with that reason instead of routing it."""
    model = EinsumLM("bsd,fd->bsf").eval()
    for layer in model.layers:
        layer.ffn = "bsd,fd->bsf"
        layer._product = lambda x, w, _l=layer: (torch.einsum("bsd,fd->bfs", x, w).transpose(1, 2)
                                                 if w.shape[0] == FF else torch.einsum("bsf,df->bsd", x, w))
    ir = routefx.inspect(model, (_ids(),))
    assert {b.ffn.kind for b in ir.blocks} == {"unknown"}
    assert "einsum 'bsd,fd->bfs' is not a per-token linear map" in ir.blocks[0].ffn.reason
    with pytest.raises(routefx.PolicyError, match="bsd,fd->bfs"):
        routefx.compile(model, Duo(budget=0.5, small="nested"), calibration=[_ids(4, 16)], example_inputs=(_ids(),))
