"""Public policy namespace: `routefx.policies.Dense()`, ..."""
from routefx.compiler.policies import (ROUTERS, Dense, Duo, MoEBudget, MoEfy, Policy, PruneLayers, policy_from_dict,
                                      policy_from_json)

__all__ = ["Policy", "Dense", "PruneLayers", "Duo", "MoEBudget", "MoEfy", "ROUTERS", "policy_from_dict",
           "policy_from_json"]
