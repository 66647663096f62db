"""The separate small branch's down projection: a least-squares fit shrunk towards the nested branch, its strength
chosen on held-out calibration tokens (`calibrate/duo.fit_separate_branch`)."""
import torch

from routefx.calibrate import duo
from routefx.compiler.plan import LayerPlan

D, F_, K = 64, 256, 64


def _layer(n_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_up, w_down = torch.randn(F_, D, generator=g) / 8, torch.randn(D, F_, generator=g) / 16
    h = torch.relu(torch.randn(n_tokens, D, generator=g) @ w_up.T)            # calibration activations
    h_val = torch.relu(torch.randn(2000, D, generator=g) @ w_up.T)            # other tokens, never fitted on
    top = torch.argsort(h.abs().mean(0) * w_down.norm(dim=0), descending=True)[:K]
    w = {"up": w_up, "gate": None, "down": w_down, "b_up": None, "b_gate": None, "b_down": None}
    lp = LayerPlan(F=F_, k=K, perm=torch.arange(F_), router="local", small="separate")
    rec = {}
    duo.fit_separate_branch(lp, w, h[:, top], h @ w_down.T, top, rec)
    y_val = h_val @ w_down.T
    rel = lambda y: float(((y - y_val) ** 2).sum() / (y_val ** 2).sum())  # noqa: E731
    return rel(h_val[:, top] @ lp.small_down.T), rel(h_val[:, top] @ w_down[:, top].T), rec, (h, h_val, top, w_down)


def test_few_calibration_tokens_do_not_overfit():
    """40 tokens for a 64-neuron branch: the unshrunk fit interpolates the calibration data and generalises worse
    than the nested branch; the shrunk fit is better than nested on tokens it never saw."""
    sep, nested, rec, (h, h_val, top, w_down) = _layer(40)
    assert sep < nested
    H, T = h[:, top].double(), (h @ w_down.T).double()
    plain = torch.linalg.lstsq(H, T).solution                                   # minimum-norm interpolation
    y_val = (h_val @ w_down.T).double()
    plain_err = float(((h_val[:, top].double() @ plain - y_val) ** 2).sum() / (y_val ** 2).sum())
    assert plain_err > nested > sep                                             # what shrinkage protects against
    assert rec["shrink"] == "nested" or rec["shrink"] >= 1e-3


def test_many_calibration_tokens_fit_like_least_squares():
    sep, nested, rec, (h, h_val, top, w_down) = _layer(4000)
    H, T = h[:, top].double(), (h @ w_down.T).double()
    plain = torch.linalg.lstsq(H, T).solution
    y_val = (h_val @ w_down.T).double()
    plain_err = float(((h_val[:, top].double() @ plain - y_val) ** 2).sum() / (y_val ** 2).sum())
    assert sep < 0.6 * nested and abs(sep - plain_err) < 0.02 * plain_err + 1e-3
