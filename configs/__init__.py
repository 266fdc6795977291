"""The Hydra config tree, shipped as the package `l2a_configs` (folder `configs/`): YAML only.

Installed entry points find it through Hydra's `pkg://l2a_configs` search path, editable
install or not. The commands' wrapper (`hydra_app`, `compose`) and the error for bad input
(`UserError`) live in `l2a_common`, so that no layer imports the config tree to raise an error.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
