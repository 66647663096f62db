"""Public policy namespace: `routefx.policies.Dense()`, ..."""
from routefx.compiler.policies import Dense, Policy, PruneLayers, policy_from_dict, policy_from_json

__all__ = ["Policy", "Dense", "PruneLayers", "policy_from_dict", "policy_from_json"]
