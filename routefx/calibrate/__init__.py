"""Calibration: data in, decisions out. `stage.calibrate` turns a policy into a Plan before the rewrite; the
budget step (`budget.FitBudget`) measures the rewritten graph and fixes the price λ."""
