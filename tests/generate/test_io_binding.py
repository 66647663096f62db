"""The ONNX decode through IO binding (`OnnxRunner.run_ortvalues`, used by `Stepper`): the same logits and cache as
the runner's plain call over several steps (batch 2, left padding), the cache kept as OrtValues between steps,
rewinds through `Stepper.past`, and inputs checked as in the plain call."""
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


def test_bound_steps_equal_plain_steps_and_eager(llama):
    """Five decode steps (the last one extends by 3 tokens, a speculative verify's shape): the bound path's logits
    and cache equal the plain call's (same session, same inputs: bit for bit) and the eager backend's."""
    entry, onnx, eager = llama
    ids, mask = _prompt(entry)
    bound, plain, ref = Stepper(onnx, mask), Stepper(onnx, mask, io_binding=False), Stepper(eager, mask)
    lb, lp, lr = bound.prefill(ids), plain.prefill(ids), ref.prefill(ids)
    g = torch.Generator().manual_seed(9)
    for step in range(5):
        new = torch.randint(3, entry.vocab, (2, 3 if step == 4 else 1), generator=g)
        lb, lp, lr = bound.extend(new), plain.extend(new), ref.extend(new)
        assert all(isinstance(v, ort.OrtValue) for v in bound._past)      # the cache never left ONNX Runtime
        assert all(isinstance(v, torch.Tensor) for v in plain._past)
        assert torch.equal(lb, lp), step
        pb, pp, pr = bound.past, plain.past, ref.past
        assert len(pb) == len(pp) == len(pr) == 2 * len(generation_graphs(onnx).kept)
        for a, b, r in zip(pb, pp, pr):
            assert a.shape == b.shape == r.shape == (2, r.shape[1], bound.mask.shape[1], r.shape[3])
            assert torch.equal(a, b)
            assert_close_nonpad(a.transpose(1, 2), r.transpose(1, 2), bound.mask, ONNX_VS_EAGER)
        assert_close_nonpad(lb, lr, None, ONNX_VS_EAGER)
    assert torch.equal(bound.mask, plain.mask) and torch.equal(bound.pos, plain.pos)


def test_rewound_cache_is_fed_back(llama):
    """A rewind assigns torch slices of the bound cache (as speculative decoding does); the next step reads them
    and computes what the plain path computes from the same rewind."""
    entry, onnx, _ = llama
    ids, mask = _prompt(entry)
    bound, plain = Stepper(onnx, mask), Stepper(onnx, mask, io_binding=False)
    bound.prefill(ids), plain.prefill(ids)
    first = torch.tensor([[5], [6]])
    for st in (bound, plain):
        st.extend(torch.tensor([[5, 7, 8], [6, 9, 4]]))                    # 3 tokens, then keep only the first
        keep = st.mask.shape[1] - 2
        st.past = [t[:, :, :keep] for t in st.past]
        st.mask, st.pos = st.mask[:, :keep], st.pos - 2
    lb, lp = bound.extend(torch.tensor([[3], [3]])), plain.extend(torch.tensor([[3], [3]]))
    assert torch.equal(lb, lp)
    fresh = Stepper(onnx, mask, io_binding=False)                           # the same tokens without the rewind
    fresh.prefill(ids), fresh.extend(first)
    assert_close_nonpad(lb, fresh.extend(torch.tensor([[3], [3]])), None, ONNX_VS_EAGER)


def test_run_ortvalues_checks_inputs(llama):
    _, onnx, _ = llama
    run = generation_graphs(onnx).decode.run
    st = Stepper(onnx, torch.ones(1, 4, dtype=torch.long))
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
