"""Analysis tools over compiled models: forced routes, oracle routing, token difficulty. Never inference paths."""
