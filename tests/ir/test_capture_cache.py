"""A model captured again, or one built the same way, reuses torch.export's result (routefx/ir/capture_cache.py)
with its own weights bound; a change of anything the graph depends on exports again, and the graph then computes
the changed model. The cache keeps neither models nor weights alive."""
import gc
import weakref

import pytest
import torch
from torch import nn

import routefx
from routefx.ir import capture, capture_cache
from routefx.policies import Dense, PruneLayers
from tests.zoo import ZOO, example_inputs


@pytest.fixture
def exports(monkeypatch):
    """The number of torch.export.export calls so far."""
    count = [0]
    real = torch.export.export

    def counting(*a, **k):
        count[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(torch.export, "export", counting)
    kept = dict(capture_cache._kept)        # this process's other tests keep theirs (restored after)
    routefx.clear_capture_cache()
    yield count
    routefx.clear_capture_cache()
    capture_cache._kept.update(kept)


class _Slots:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v


class _Cfg:
    def __init__(self):
        self.inner = type("Inner", (), {})()
        self.inner.shift = 0.0


def _offset(h):
    return h + 0.5


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.scale = 2.0
        self.cfg = _Cfg()
        self.act = torch.tanh

    def forward(self, x, mode: str = "plain"):
        h = _offset(self.act(self.a(x)) * self.scale + self.cfg.inner.shift)
        if mode == "twice":
            h = h * 2
        return self.b(h)


def _check(model, x, **kw):
    gm = capture(model, (x,), kw)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, **kw), model(x, **kw), rtol=0, atol=0)
    return gm


def test_a_second_capture_reuses_the_export_and_gets_its_own_graph(exports):
    entry = ZOO["llama"]
    model = entry.build()
    args, kwargs = example_inputs(entry)
    g1 = capture(model, args, kwargs)
    g2 = capture(model, args, kwargs)
    assert exports[0] == 1 and g1 is not g2 and g1.graph is not g2.graph
    n = next(n for n in g1.graph.nodes if n.op == "call_function")   # a rewrite of one graph leaves the other
    n.meta["changed"] = True
    assert "changed" not in next(n for n in g2.graph.nodes if n.op == "call_function").meta
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
        torch.testing.assert_close(g2(*args, **kwargs, use_cache=False).logits, ref, rtol=0, atol=0)
    kwargs_f64 = {**kwargs, "attention_mask": kwargs["attention_mask"].double()}   # another input form
    capture(model, args, kwargs_f64)
    assert exports[0] == 2
    capture(model, args, kwargs)                                    # both forms kept
    assert exports[0] == 2


def _hook(m):
    m.a.register_forward_hook(lambda mod, i, o: o + 1)


def _wrap_b(m):
    m.b = nn.Sequential(m.b)


def _tie(m):
    m.b.weight = m.a.weight


def _new_weight(m):
    m.a.weight = nn.Parameter(torch.randn(8, 8))


def _same_kind_of_submodule(m):
    m.b = nn.Linear(8, 8)


@pytest.mark.parametrize("change", [
    lambda m: setattr(m, "scale", 3.0),
    lambda m: setattr(m.cfg.inner, "shift", 1.0),        # an attribute of an object the module holds
    lambda m: setattr(m, "act", torch.sigmoid),
    _wrap_b,
    _hook,
    _tie,
    lambda m: m.to(torch.float64),
], ids=["attribute", "nested_attribute", "function", "submodule", "hook", "tied", "dtype"])
def test_a_change_of_the_graph_exports_again(exports, change):
    model = _Net()
    x = torch.randn(2, 3, 8)
    _check(model, x)
    _check(model, x)
    assert exports[0] == 1
    with torch.no_grad():
        change(model)
    x = x.to(model.a.weight.dtype)
    _check(model, x)                 # the changed model's graph
    assert exports[0] == 2
    _check(model, x)                 # and kept again
    assert exports[0] == 2


@pytest.mark.parametrize("where", ["method", "global"])
def test_patched_code_exports_again(exports, monkeypatch, where):
    """A class's method, or a global its code reads, replaced between two captures."""
    import sys
    model = _Net()
    x = torch.randn(2, 3, 8)
    _check(model, x)
    if where == "method":
        monkeypatch.setattr(_Net, "forward", lambda self, x, mode="plain": self.b(self.a(x)))
    else:
        monkeypatch.setattr(sys.modules[__name__], "_offset", lambda h: h - 1.0)
    _check(model, x)
    assert exports[0] == 2


@pytest.mark.parametrize("change", [
    lambda m: m.a.weight.mul_(-1),
    lambda m: m.a.weight.data.mul_(-1),                  # past the version counter
    _new_weight,
    _same_kind_of_submodule,
    lambda m: m.load_state_dict(_Net().state_dict() | {"b.bias": torch.ones(8)}),
], ids=["in_place", "through_data", "new_parameter", "new_submodule", "load_state_dict"])
def test_new_weights_reuse_the_export_and_are_the_ones_computed_with(exports, change):
    model = _Net()
    x = torch.randn(2, 3, 8)
    before = _check(model, x)(x)
    with torch.no_grad():
        change(model)
    assert not torch.equal(_check(model, x)(x), before)
    assert exports[0] == 1


def test_a_model_built_the_same_way_reuses_the_export_with_its_own_weights(exports):
    entry = ZOO["llama"]
    first, second = entry.build(), entry.build()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in second.parameters():
            p.normal_(0, 0.05)
    args, kwargs = example_inputs(entry)
    capture(first, args, kwargs)
    gm = capture(second, args, kwargs)
    assert exports[0] == 1
    with torch.no_grad():
        want = second(*args, **kwargs).logits
        torch.testing.assert_close(gm(*args, **kwargs, use_cache=False).logits, want, rtol=0, atol=0)
        assert not torch.allclose(first(*args, **kwargs).logits, want)


class _Held(nn.Module):
    """Tensors held directly: a plain attribute (a constant of the export) and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(8)
        self.register_buffer("b", torch.randn(8), persistent=False)

    def forward(self, x):
        return x * self.w + self.b


def _two_built(cls, x):
    """Two models of `cls` captured one after the other; returns the first."""
    first, second = cls(), cls()
    _check(first, x)
    _check(second, x)
    return first


def test_tensors_held_directly_are_bound_by_name(exports):
    _two_built(_Held, torch.randn(2, 3, 8))
    assert exports[0] == 1


class _Table(nn.Module):
    """A tensor inside a container: not a named tensor of the model, so keyed by identity."""

    def __init__(self):
        super().__init__()
        self.table = [torch.randn(8)]

    def forward(self, x):
        return x * self.table[0]


def test_a_tensor_inside_a_container_is_the_same_tensor_or_exported_again(exports):
    x = torch.randn(2, 3, 8)
    first = _two_built(_Table, x)
    assert exports[0] == 2
    first.table[0].mul_(2)
    _check(first, x)
    assert exports[0] == 3


def test_inputs_are_keyed_by_form_and_constant_values(exports):
    model = _Net()
    x = torch.randn(2, 3, 8)
    _check(model, x)
    _check(model, torch.randn(2, 3, 8))             # other values, same form
    assert exports[0] == 1
    _check(model, x, mode="twice")                   # a constant input
    _check(model, torch.randn(4, 5, 8))              # another batch size and length: the export serves them
    assert exports[0] == 2
    _check(model, torch.randn(2, 3, 4, 8))           # another rank: a dim that is not the batch or the length
    _check(model, torch.randn(2, 3, 5, 8))           # its size is keyed: exported again
    assert exports[0] == 4


def test_other_batch_sizes_and_lengths_reuse_the_export_where_it_holds_for_them(exports):
    """The batch and length dims are exported as dynamic: a capture at other sizes reuses the graph where the
    sizes export made constants and its guards hold for them, and exports again (keeping both) where not."""
    model = _Net()
    for b, s in [(2, 3), (3, 7), (1, 1), (5, 2)]:
        gm = _check(model, torch.randn(b, s, 8))
    assert exports[0] == 1 and gm.meta["routefx"].reused_export

    class Chunked(nn.Module):        # a scan in chunks of 4: export guards the length it was traced at
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8)

        def forward(self, x):
            if x.shape[1] <= 4:
                return self.w(x)
            return torch.cat([self.w(c) * 2 for c in x.split(4, dim=1)], dim=1)

    chunked = Chunked()
    _check(chunked, torch.randn(2, 3, 8))            # S <= 4
    _check(chunked, torch.randn(3, 4, 8))            # reused
    assert exports[0] == 2
    _check(chunked, torch.randn(2, 7, 8))            # S > 4: the kept graph's guard fails, exported again
    assert exports[0] == 3
    _check(chunked, torch.randn(1, 2, 8))            # both kept: each size finds its own
    _check(chunked, torch.randn(2, 6, 8))
    assert exports[0] == 3

    class FixedLength(nn.Module):    # the code turns the length into a Python int: export makes it a constant
        def forward(self, x):
            s = int(x.shape[1])
            return x * torch.arange(s, dtype=x.dtype)[:, None]

    fixed = FixedLength()
    _check(fixed, torch.randn(2, 3, 8))
    _check(fixed, torch.randn(4, 3, 8))              # the batch is still dynamic
    assert exports[0] == 4
    _check(fixed, torch.randn(2, 5, 8))              # another length: exported again
    _check(fixed, torch.randn(2, 3, 8))
    assert exports[0] == 5


def test_a_value_it_cannot_compare_exports_every_time(exports):
    model = _Net()
    model.opaque = _Slots(1)
    x = torch.randn(2, 3, 8)
    _check(model, x)
    _check(model, x)
    assert exports[0] == 2


def test_the_cache_keeps_no_model_and_no_weights_alive(exports):
    model = _Net()
    capture(model, (torch.randn(2, 3, 8),))
    refs = [weakref.ref(model), weakref.ref(model.a.weight), weakref.ref(model.b.bias)]
    del model
    gc.collect()
    assert all(r() is None for r in refs)


def test_compiling_a_model_again_exports_it_once_and_clear_forgets(exports):
    entry = ZOO["llama"]
    model = entry.build()
    args, kwargs = example_inputs(entry)
    dense = routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs)
    pruned = routefx.compile(model, PruneLayers(layers=[1]), example_inputs=args, example_kwargs=kwargs)
    assert exports[0] == 1
    assert not any("reused" in n for n in dense.report.notes)
    assert any("capture reused torch.export's result" in n for n in pruned.report.notes)
    with torch.no_grad():
        torch.testing.assert_close(dense(*args, **kwargs).logits, model(*args, **kwargs).logits, rtol=0, atol=0)
    assert pruned.report.pass_report("prune_blocks").rewrites == 1
    assert len(dense.ir.blocks) == len(pruned.ir.blocks) + 1      # the pruning did not reach the kept export
    routefx.clear_capture_cache()
    routefx.compile(model, Dense(), example_inputs=args, example_kwargs=kwargs)
    assert exports[0] == 2
    routefx.compile(entry.build(), Dense(), example_inputs=args, example_kwargs=kwargs)   # built again: kept
    assert exports[0] == 2


def test_generation_steps_are_exported_once(exports):
    """Two compiled models of models built the same way (other weights) generate: the prefill and decode steps are
    exported once (the second generates from the kept exports, token for token as Hugging Face `generate` with
    its own weights), and the model still dies."""
    entry = ZOO["llama"]
    other = entry.build()
    routefx.compile(other, Dense()).generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    model = entry.build()
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, entry.vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    first = routefx.compile(model, Dense()).generate(ids, mask, max_new_tokens=6)
    done = exports[0]
    second = routefx.compile(model, Dense(), backend="onnx").generate(ids, mask, max_new_tokens=6)
    assert exports[0] == done and torch.equal(first, ref) and torch.equal(second, ref)
    ref_model = weakref.ref(model)
    del model
    gc.collect()
    assert ref_model() is None
