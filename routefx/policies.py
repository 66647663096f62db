"""Public policy namespace: `routefx.policies.Dense()`, ..."""
from routefx.compiler.policies import Dense, Policy, policy_from_dict, policy_from_json

__all__ = ["Policy", "Dense", "policy_from_dict", "policy_from_json"]
