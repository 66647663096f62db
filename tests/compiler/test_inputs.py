"""Input validation: a bad call gets the same typed `InputError` on every backend, before anything runs; no
backend returns silently wrong output (ONNX's Gather wraps negative ids around, eager's raises IndexError)."""
import dataclasses
import functools

import pytest
import torch

import routefx
from routefx.compiler.validate import _as_integral, input_spec
from tests.compare import assert_close_nonpad
from tests.tolerances import EXACT_REWRITE, ONNX_VS_EAGER
from tests.zoo import ZOO, example_inputs

VOCAB = ZOO["llama"].vocab


@functools.lru_cache(maxsize=None)
def _compiled(backend: str):
    entry = ZOO["llama"]
    model = entry.build()
    args, kwargs = example_inputs(entry, batch=2, seq=9, left_pad=2)
    cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs,
                         backend=backend)
    return model, cm


def _ids(batch=2, seq=9, seed=3):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


BACKENDS = ["eager", "onnx"]


def test_vocabulary_is_read_from_the_embedding():
    _, cm = _compiled("eager")
    spec = {t.name: t for t in input_spec(cm.graph_module).tensors}
    assert spec["input_ids"].vocab == VOCAB            # the embedding table's rows
    assert spec["attention_mask"].vocab is None        # feeds no embedding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 399, -3])
def test_token_id_out_of_range(backend, bad):
    _, cm = _compiled(backend)
    ids = _ids()
    ids[1, 4] = bad
    with pytest.raises(routefx.InputError, match=rf"'input_ids' holds token id {bad} at position \[1, 4\]; "
                                                 rf".*ids in \[0, {VOCAB}\)"):
        cm(ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_ids_are_accepted_and_match_the_model(backend):
    model, cm = _compiled(backend)
    ids = _ids()
    ids[0, 0], ids[1, -1] = 0, VOCAB - 1
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert_close_nonpad(cm(ids, attention_mask=mask), ref, mask, ONNX_VS_EAGER)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_shape,what", [((2, 7), r"sequence length 7 disagrees with 'input_ids' \(9\)"),
                                             ((3, 9), r"batch size 3 disagrees with 'input_ids' \(2\)")])
def test_mask_of_another_shape(backend, mask_shape, what):
    _, cm = _compiled(backend)
    with pytest.raises(routefx.InputError, match=rf"'attention_mask' has shape \[{mask_shape[0]}, "
                                                 rf"{mask_shape[1]}\]: its {what}"):
        cm(_ids(), attention_mask=torch.ones(mask_shape, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,what", [((2, 0), "sequence"), ((0, 9), "batch")])
def test_empty_inputs(backend, shape, what):
    _, cm = _compiled(backend)
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(routefx.InputError, match=rf"'input_ids' has shape \[{shape[0]}, {shape[1]}\]: an empty "
                                                 rf"{what}; routefx runs at least one token"):
        cm(ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_inputs_of_another_integer_dtype_are_taken(backend):
    """int32 ids, a bool mask and a 0/1 float mask on a graph captured with int64 ones: the same output as the
    int64 call (and no new capture); values that do not fit the captured dtype, or are not whole, are refused."""
    model, cm = _compiled(backend)
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    ref = cm(ids, attention_mask=mask)
    entries = len(cm._entries)
    out = cm(ids.int(), attention_mask=mask.bool())
    assert len(cm._entries) == entries
    assert_close_nonpad(out, ref, mask, 0.0)
    assert_close_nonpad(cm(ids, attention_mask=mask.float()), ref, mask, 0.0)   # a 0/1 mask in floats
    assert len(cm._entries) == entries
    with pytest.raises(routefx.InputError, match=r"'attention_mask' has dtype torch.float32 and rank 2"):
        cm(ids, attention_mask=mask * 0.5)   # not a 0/1 mask: refused, not rounded
    with torch.no_grad():
        assert_close_nonpad(out, model(ids, attention_mask=mask), mask, ONNX_VS_EAGER)
    spec = next(t for t in input_spec(cm.graph_module).tensors if t.name == "input_ids")
    narrow = dataclasses.replace(spec, dtype=torch.int8)   # a graph captured with int8 ids
    with pytest.raises(routefx.InputError, match=r"'input_ids' has values in \[0, 300\], outside the range of "
                                                 r"torch.int8"):
        _as_integral(narrow, torch.tensor([[0, 300]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtype(backend):
    _, cm = _compiled(backend)
    with pytest.raises(routefx.InputError, match=r"'input_ids' has dtype torch.float32 and rank 2; the compiled "
                                                 r"model takes dtype torch.int64"):
        cm(_ids().float(), attention_mask=torch.ones(2, 9, dtype=torch.long))


def test_a_model_in_training_mode_with_dropout_is_compiled_as_in_eval_mode_and_says_so():
    """routefx compiles for inference: a model left in training mode whose output depends on it (dropout) gets
    a warning naming what differs, and the compiled model computes the eval-mode model; a training-mode model
    without dropout compiles without one."""
    import warnings
    entry = ZOO["gpt2"]
    model = entry.build()
    model.config.attn_pdrop = model.config.resid_pdrop = 0.25
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.25
    model.train()
    args, kwargs = example_inputs(entry, batch=2, seq=9, left_pad=2)
    with pytest.warns(UserWarning, match=r"GPT2LMHeadModel is in training mode \(Dropout\(p=0\.25\).*runs it as "
                                         r"model\.eval\(\) would"):
        cm = routefx.compile(model, routefx.policies.Dense(), example_inputs=args, example_kwargs=kwargs)
    assert model.training                      # left as it was
    out = cm(*args, **kwargs)
    with torch.no_grad():
        ref = model.eval()(*args, **kwargs)
    assert_close_nonpad(out, ref, kwargs["attention_mask"], EXACT_REWRITE)
    plain = ZOO["llama"].build().train()       # no dropout: nothing to say
    largs, lkwargs = example_inputs(ZOO["llama"], batch=2, seq=9, left_pad=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*in training mode")
        routefx.compile(plain, routefx.policies.Dense(), example_inputs=largs, example_kwargs=lkwargs)
