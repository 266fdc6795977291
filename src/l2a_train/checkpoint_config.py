"""The one reader of a Hugging Face checkpoint directory's config.json (model type, layer types,
dtype, positions, ...), for every check made before a model loads."""

from __future__ import annotations

import json
from pathlib import Path

from l2a_common import UserError

HINT = "give a local Hugging Face checkpoint directory"


def read_config(path, setting: str = "model.path", hint: str = HINT) -> dict:
    """config.json of checkpoint directory `path`; a missing or broken one is one line naming `setting`."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise UserError(f"{setting}={path} {what}; {hint}")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file}: not valid JSON ({err})") from None
