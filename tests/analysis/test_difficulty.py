"""Token-difficulty statistics (routefx/analysis/difficulty.py) against numpy references."""
import numpy as np
import pytest
import torch

from routefx.analysis.difficulty import pearson, spearman


def _avg_ranks(a):
    """Average ranks by counting: rank_i = #{j: a_j < a_i} + (#{j: a_j == a_i} - 1) / 2."""
    less = (a[:, None] > a[None, :]).sum(1)
    ties = (a[:, None] == a[None, :]).sum(1)
    return less + (ties - 1) / 2


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_numpy(seed):
    g = np.random.default_rng(seed)
    a = g.integers(0, 6, 45).astype(float)                 # many ties
    b = 0.5 * a + g.normal(size=45)
    assert pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    ref = np.corrcoef(_avg_ranks(a), _avg_ranks(b))[0, 1]
    assert spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(ref, abs=1e-12)
    assert spearman(torch.tensor(a), torch.tensor(np.exp(a))) == pytest.approx(1.0, abs=1e-12)
