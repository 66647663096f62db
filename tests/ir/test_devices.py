"""Recognition follows the model's device: on a `meta` model (no values at all) `inspect` finds what it finds on
CPU. The probes that need values (attention masks, activations) run on CPU and read nothing from the device."""
import pytest
import torch

import routefx
from routefx.ir import recognize
from tests.zoo import ZOO, example_inputs


@pytest.mark.parametrize("name", ["llama", "gemma3"])   # causal; sliding window + causal
def test_inspect_on_meta_matches_cpu(name, zoo_capture):
    entry = ZOO[name]
    args, kwargs = example_inputs(entry)
    cpu = recognize(zoo_capture(name)[1]).to_dict()
    meta = entry.build().to("meta")
    got = routefx.inspect(meta, tuple(a.to("meta") for a in args), {k: v.to("meta") for k, v in kwargs.items()})
    assert got.to_dict() == cpu
    assert all(a.pattern != "custom" for b in got.blocks for a in b.attention)   # the mask probe really ran
