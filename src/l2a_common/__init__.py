"""l2a_common: what every command shares, whatever its layer: the error for bad input and the
command wrapper.

    from l2a_common import UserError          # bad input the user can fix: one line, exit status 2
    main = hydra_app("train")(run)            # a console-script main() over the config tree

Its own package (folder `src/l2a_common/`) because both `l2a_data_prep` (upstream) and
`l2a_train` raise and catch these errors, and data prep must not import the trainer; the config
tree (`l2a_configs`) holds YAML only. Imports nothing of the project at import time.
"""

from .app import check_python, compose, hydra_app
from .errors import UserError, fail

__all__ = ["UserError", "fail", "hydra_app", "compose", "check_python"]
