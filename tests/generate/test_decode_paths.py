"""The ONNX decode's fast paths (`Stepper(path=...)`: `OnnxRunner.run_arrays`, numpy arrays; `run_ortvalues`, IO
binding): the same logits and cache as the runner's plain call over several steps (batch 2, left padding), the
cache kept in ONNX Runtime's buffers between steps, rewinds through `Stepper.past`, and inputs checked."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import routefx
from routefx.errors import InputError
from routefx.generate.graphs import generation_graphs
from routefx.generate.loop import Stepper
from routefx.policies import Dense
from tests.compare import assert_close_nonpad
from tests.tolerances import ONNX_VS_EAGER
from tests.zoo import ZOO


@pytest.fixture(scope="module")
def llama():
    entry = ZOO["llama"]
    model = entry.build()
    return entry, routefx.compile(model, Dense(), backend="onnx"), routefx.compile(model, Dense())


def _prompt(entry):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, entry.vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                  # left padding on the first row
    return ids, mask


_CARRIER = {"arrays": np.ndarray, "io_binding": ort.OrtValue, "call": torch.Tensor}


@pytest.mark.parametrize("path", ["arrays", "io_binding"])
def test_fast_steps_equal_plain_steps_and_eager(llama, path):
    """Five decode steps (the last one extends by 3 tokens, a speculative verify's shape): the fast path's logits
    and cache equal the plain call's (same session, same inputs: bit for bit) and the eager backend's."""
    entry, onnx, eager = llama
    ids, mask = _prompt(entry)
    fast, plain, ref = Stepper(onnx, mask, path=path), Stepper(onnx, mask, path="call"), Stepper(eager, mask)
    lb, lp, lr = fast.prefill(ids), plain.prefill(ids), ref.prefill(ids)
    g = torch.Generator().manual_seed(9)
    for step in range(5):
        new = torch.randint(3, entry.vocab, (2, 3 if step == 4 else 1), generator=g)
        lb, lp, lr = fast.extend(new), plain.extend(new), ref.extend(new)
        assert all(isinstance(v, _CARRIER[path]) for v in fast._past)       # the cache never became torch
        assert all(isinstance(v, torch.Tensor) for v in plain._past)
        assert isinstance(lb, torch.Tensor) and torch.equal(lb, lp), step
        pb, pp, pr = fast.past, plain.past, ref.past
        assert len(pb) == len(pp) == len(pr) == 2 * len(generation_graphs(onnx).kept)
        for a, b, r in zip(pb, pp, pr):
            assert a.shape == b.shape == r.shape == (2, r.shape[1], fast.mask.shape[1], r.shape[3])
            assert torch.equal(a, b)
            assert_close_nonpad(a.transpose(1, 2), r.transpose(1, 2), fast.mask, ONNX_VS_EAGER)
        assert_close_nonpad(lb, lr, None, ONNX_VS_EAGER)
    assert torch.equal(fast.mask, plain.mask) and torch.equal(fast.pos, plain.pos)


@pytest.mark.parametrize("path", ["arrays", "io_binding"])
def test_rewound_cache_is_fed_back(llama, path):
    """A rewind assigns torch slices of the cache (as speculative decoding does); the next step reads them and
    computes what the plain path computes from the same rewind, and what a run without the rewind computes."""
    entry, onnx, _ = llama
    ids, mask = _prompt(entry)
    fast, plain = Stepper(onnx, mask, path=path), Stepper(onnx, mask, path="call")
    fast.prefill(ids), plain.prefill(ids)
    for st in (fast, plain):
        st.extend(torch.tensor([[5, 7, 8], [6, 9, 4]]))                    # 3 tokens, then keep only the first
        keep = st.mask.shape[1] - 2
        st.past = [t[:, :, :keep] for t in st.past]
        st.mask, st.pos = st.mask[:, :keep], st.pos - 2
    lb, lp = fast.extend(torch.tensor([[3], [3]])), plain.extend(torch.tensor([[3], [3]]))
    assert torch.equal(lb, lp)
    fresh = Stepper(onnx, mask, path="call")                                # the same tokens without the rewind
    fresh.prefill(ids), fresh.extend(torch.tensor([[5], [6]]))
    assert_close_nonpad(lb, fresh.extend(torch.tensor([[3], [3]])), None, ONNX_VS_EAGER)


def test_unknown_path_is_refused(llama):
    with pytest.raises(InputError, match="path must be one of"):
        Stepper(llama[1], torch.ones(1, 2, dtype=torch.long), path="fast")


def test_run_arrays_checks_inputs(llama):
    _, onnx, _ = llama
    g = generation_graphs(onnx)
    st = Stepper(onnx, torch.ones(1, 4, dtype=torch.long))
    st.prefill(torch.ones(1, 4, dtype=torch.long))
    st.extend(torch.tensor([[3]]))
    base = dict(input_ids=np.array([[4]]), attention_mask=np.ones((1, 6), dtype=np.int64),
                position_ids=np.array([[5]]), **dict(zip(g.past_names, st._past)))
    run = g.decode.run
    with pytest.raises(InputError, match="'input_ids' is int32 of rank 2; the ONNX model takes int64 of rank 2"):
        run.run_arrays({**base, "input_ids": np.array([[4]], dtype=np.int32)})
    with pytest.raises(InputError, match="run_arrays takes every input"):
        run.run_arrays({k: v for k, v in base.items() if k != "position_ids"})
    with pytest.raises(InputError, match="'position_ids' is missing"):
        run.run_arrays({**{k: v for k, v in base.items() if k != "position_ids"}, "positions": base["position_ids"]})
    with pytest.raises(InputError, match="'input_ids' is int32"):                        # through the Stepper
        st.extend(torch.tensor([[3]], dtype=torch.int32))
    out = run.run_arrays(base)
    assert len(out) == len(run.output_names) and all(isinstance(v, np.ndarray) for v in out)


def test_run_ortvalues_checks_inputs(llama):
    _, onnx, _ = llama
    run = generation_graphs(onnx).decode.run
    st = Stepper(onnx, torch.ones(1, 4, dtype=torch.long), path="io_binding")
    st.prefill(torch.ones(1, 4, dtype=torch.long))
    st.extend(torch.tensor([[3]]))
    feeds = dict(zip(generation_graphs(onnx).past_names, st._past))
    base = dict(input_ids=torch.tensor([[4]]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                position_ids=torch.tensor([[5]]), **feeds)
    with pytest.raises(InputError, match="'input_ids' has dtype torch.float32"):
        run.run_ortvalues(**{**base, "input_ids": torch.tensor([[4.0]])})
    wrong = ort.OrtValue.ortvalue_from_numpy(torch.zeros(1, 6, dtype=torch.int32).numpy())
    with pytest.raises(InputError, match="'attention_mask' is an OrtValue of type tensor\\(int32\\)"):
        run.run_ortvalues(**{**base, "attention_mask": wrong})
    with pytest.raises(InputError, match="missing input 'position_ids'"):
        run.run_ortvalues(**{k: v for k, v in base.items() if k != "position_ids"})
    out = run.run_ortvalues(**base)
    assert len(out) == len(run.output_names) and all(isinstance(v, ort.OrtValue) for v in out)


def test_generation_graphs_lower_directly_with_per_row_rotary(llama):
    """The prefill and decode graphs take position_ids per row (left padding), so their rotary angle tables are
    [B, S, H/2]: both lower from the captured graph itself (no in-place `detach_` from the cache's
    `torch.tensor([])` left to make export re-trace), with every rotary embedding fused into RotaryEmbedding
    reading the flattened table, the decode step's attention (keys = the cache input + the step's) keeps no
    run-time causal check, and the decode step equals eager with ONNX Runtime's optimizations on and off."""
    entry, onnx, eager = llama
    ids, mask = _prompt(entry)
    fast, ref = Stepper(onnx, mask, path="call"), Stepper(eager, mask)
    fast.prefill(ids)
    ref.prefill(ids)
    g = generation_graphs(onnx)
    layers = entry.expect.blocks
    for graph in (g.prefill, g.decode):
        assert graph.run.export_path == "direct", graph.run.notes
        assert graph.run.fusions["rotary"] == 2 * layers, graph.run.notes
    assert not any(n.target is torch.ops.aten.detach_.default for n in g.decode.gm.graph.nodes)
    # the decode step's attention reads past + new keys: no run-time causal check (it could never pass)
    assert g.decode.run.fusions["causal_gqa"] == 0
    notes = g.decode.run.notes
    assert any("keys are the cache input plus the step's keys" in note for note in notes), notes
    new = torch.tensor([[5, 6, 7], [8, 9, 10]])
    feeds = dict(input_ids=new, attention_mask=torch.cat([fast.mask, torch.ones_like(new)], dim=1),
                 position_ids=fast.pos + torch.arange(1, 4), **dict(zip(g.past_names, fast.past)))
    expected = ref.extend(new)
    for level in ("all", "disable"):
        out = g.decode.run.at_level(level)(**feeds)
        assert_close_nonpad(out[0], expected, None, ONNX_VS_EAGER)
