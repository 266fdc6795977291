"""The Hydra config tree, shipped as a package so installed entry points find it (pkg://l2a_configs)."""
