"""bench/quality.py's bookkeeping: intermediate results are reused by a resumed run (never recomputed), and
oracle agreement per layer equals a per-token count done by hand."""
import torch

from bench.quality import Parts, _agreement


def test_parts_are_computed_once_and_reused(tmp_path):
    calls = []

    def piece():
        calls.append(1)
        return {"ppl": 1.5, "rows": {0.5: [1, 2]}}

    first = Parts(str(tmp_path)).get("oracle-0.5", piece)
    again = Parts(str(tmp_path)).get("oracle-0.5", piece)        # a new run over the same folder
    assert len(calls) == 1
    assert again == first and again["ppl"] == 1.5 and again["rows"] == {"0.5": [1, 2]}
    assert "seconds" in again


def test_agreement_counts_valid_tokens_per_layer():
    gen = torch.Generator().manual_seed(0)
    router = [torch.randint(0, 3, (4, 2, 5), generator=gen) for _ in range(3)]      # [L, B, S] per batch
    oracle = [torch.randint(0, 3, (4, 2, 5), generator=gen) for _ in range(3)]
    valid = [torch.rand(2, 5, generator=gen) > 0.3 for _ in range(3)]
    got = _agreement(router, oracle, valid)
    for layer in range(4):
        same = total = 0
        for r, o, v in zip(router, oracle, valid):
            for b in range(2):
                for s in range(5):
                    if v[b, s]:
                        total += 1
                        same += int(r[layer, b, s] == o[layer, b, s])
        assert abs(got[layer] - same / total) < 1e-12
