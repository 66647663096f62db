"""FLOP counts do not depend on what torch calls the graph's shape symbols (releases name and unify them
differently): the same graph with every symbol renamed, and with the inputs' batch symbols swapped inside the
graph, gives the same count."""
import copy

import pytest
import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from routefx.ir import graph_utils as gu
from routefx.ir import recognize
from routefx.ir.flops import S, count_flops


def _symbols(gm):
    out = set()
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        dims = v.shape if isinstance(v, torch.Tensor) else [v] if isinstance(v, torch.SymInt) else []
        for d in dims:
            if isinstance(d, torch.SymInt):
                out |= sympy.sympify(d.node.expr).free_symbols
    return out


def _renamed(gm, swap_batch: bool):
    """A copy of `gm` whose fake values use fresh symbols (u0, u1, ... instead of s43, s72, ...). With
    `swap_batch`, nodes other than the inputs use the second input's batch symbol where the first's was."""
    gm = copy.deepcopy(gm)
    env = ShapeEnv()
    fresh = {s: env.create_unbacked_symint().node.expr for s in sorted(_symbols(gm), key=str)}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    inner = dict(fresh)
    if swap_batch:
        b0, b1 = (sympy.sympify(p.meta["val"].shape[0].node.expr) for p in phs[:2])
        assert b0 != b1, "the test needs inputs with separate batch symbols"
        inner[b0] = fresh[b1]
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)

    def sym(d, table):
        if not isinstance(d, torch.SymInt):
            return d
        return env.create_symintnode(sympy.sympify(d.node.expr).xreplace(table), hint=None)

    for n in gm.graph.nodes:
        v = n.meta.get("val")
        table = fresh if n in phs else inner
        if isinstance(v, torch.Tensor):
            with mode:
                n.meta["val"] = torch.empty([sym(d, table) for d in v.shape], dtype=v.dtype)
        elif isinstance(v, torch.SymInt):
            n.meta["val"] = sym(v, table)
    return gm


@pytest.mark.parametrize("name", ["llama", "mixtral"])
@pytest.mark.parametrize("swap_batch", [False, True])
def test_flops_survive_renamed_symbols(name, swap_batch, zoo_capture):
    _, gm = zoo_capture(name)
    ref = count_flops(gm, recognize(gm))
    other = _renamed(gm, swap_batch)
    assert not {str(s) for s in _symbols(other)} & {str(s) for s in _symbols(gm)}  # really renamed
    fc = count_flops(other, recognize(other))
    assert fc.total.free_symbols <= {S}
    assert sympy.simplify(fc.total - ref.total) == 0
    for seq in (5, 300):
        assert fc.at(seq)["total"] == pytest.approx(ref.at(seq)["total"], rel=1e-12)
    assert [gu.val(n) is not None for n in other.graph.nodes] == [gu.val(n) is not None for n in gm.graph.nodes]


class _PositionTableLM(torch.nn.Module):
    """PlainLM plus a position table computed by a matrix product once per call, whatever the batch (like the
    rotary tables of transformers 5.17: [1, S, 1] @ [1, 1, d])."""

    def __init__(self):
        super().__init__()
        from tests.zoo import PlainLM
        self.lm = PlainLM()
        self.freq = torch.nn.Parameter(torch.randn(1, 36))

    def forward(self, input_ids):
        S_ = input_ids.shape[1]
        pos = torch.arange(S_, dtype=torch.float32, device=input_ids.device)[None, :, None]
        table = torch.matmul(pos, self.freq[None])                  # [1, S, d]: not per token
        x = self.lm.e(input_ids) + torch.sin(table)
        for blk in self.lm.z:
            x = blk(x)
        return self.lm.o(self.lm.n(x))


def test_work_done_once_per_call_is_not_per_token_work():
    from routefx.ir import capture
    from tests.zoo import PlainLM
    torch.manual_seed(0)
    ids = torch.randint(0, 89, (2, 7))
    with_table = _PositionTableLM().eval()
    gm = capture(with_table, (ids,))
    fc = count_flops(gm, recognize(gm))
    assert fc.total.free_symbols <= {S}
    plain = capture(PlainLM().eval(), (ids,))
    ref = count_flops(plain, recognize(plain))
    assert sympy.simplify(fc.total - ref.total) == 0
    assert fc.at(64)["total"] == pytest.approx(ref.at(64)["total"], rel=1e-12)
