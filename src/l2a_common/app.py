"""The command wrapper: every console script (`l2a-prep`, `l2a-train`, `l2a-convert`,
`l2a-eval`, `l2a-prune`, `l2a-generate`) is a Hydra app over the config tree (`configs/`,
shipped as the package `l2a_configs`), made with `hydra_app`.

What the wrapper adds to plain `hydra.main`: a Python version check, one clear line for an
unknown `group=option` or an unknown setting `key=value` (Hydra's own messages are several lines
plus a stack-trace hint), and
`UserError` from the task printed as one line with exit status 2 instead of a traceback.
`check_python` runs before the environment exists too (the Makefile calls it with the system
Python), so this module imports only the standard library at import time.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from .errors import UserError, fail

SUPPORTED_PYTHON = ((3, 10), (3, 13))


def check_python(version: tuple[int, int] | None = None) -> None:
    major_minor = version or sys.version_info[:2]
    low, high = SUPPORTED_PYTHON
    if not (low <= tuple(major_minor) <= high):
        fail(
            f"Python {major_minor[0]}.{major_minor[1]} is not supported; l2a-train needs Python "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]} (create the environment with one of those, "
            "for example `python3.11 -m venv .venv`)"
        )


def config_groups() -> dict[str, list[str]]:
    """Group name -> available options, read from the folders of the config tree."""
    from l2a_configs import CONFIG_DIR

    groups = {}
    for folder in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_")):
        groups[folder.name] = sorted(f.stem for f in folder.glob("*.yaml"))
    return groups


def check_empty_arguments(argv: list[str]) -> None:
    """Reject an empty argument in one line (Hydra's message for it is a parser error at <EOF>)."""
    for position, arg in enumerate(argv, 1):
        if not arg.strip():
            fail(f"argument {position} of the command line is empty (a shell variable that expanded to \"\"?): "
                 "remove it or give a key=value setting")


def check_group_overrides(argv: list[str]) -> None:
    """Reject `group=option` overrides whose option file does not exist, in one line."""
    groups = config_groups()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in groups or value in ("", "null"):
            continue
        for option in value.split(","):  # multirun sweeps list several options
            if option not in groups[key]:
                fail(
                    f"unknown {key} option '{option}' in `{arg}`; choose one of: "
                    f"{', '.join(groups[key])} (files in configs/{key}/)"
                )


def check_setting_overrides(config_name: str, argv: list[str]) -> None:
    """Reject `key=value` overrides of settings the command's config does not have, in one line
    that suggests the setting meant (`layers=[]` -> `l2a.layers`). The config is composed with the
    command line's group choices (an experiment adds settings); anything Hydra reports better
    itself (syntax, sweeps of groups, `+key` additions, `~key` deletions, `hydra.*`) is left to it."""
    plain = [a for a in argv if not a.startswith("-") and "=" in a]
    if not plain:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig, OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except Exception:  # noqa: BLE001  (a syntax error: Hydra's message names the position)
        return
    groups = config_groups()
    chosen = [a for a, o in zip(plain, parsed) if o.key_or_group in groups]
    settings = [(a, o.key_or_group) for a, o in zip(plain, parsed)
                if o.key_or_group not in groups and not (o.is_add() or o.is_delete() or o.is_force_add())
                and o.package is None and not o.key_or_group.startswith("hydra.")]
    if not settings:
        return
    try:
        cfg = compose(config_name, chosen)
    except Exception:  # noqa: BLE001  (a sweep over groups or a bad group: Hydra reports it)
        return
    for arg, key in settings:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node.keys():
            continue
        known = _setting_names(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False))
        similar = [k for k in known if k == leaf or k.endswith("." + leaf)][:3]
        hint = f"; did you mean {' or '.join(similar)}?" if similar else ""
        fail(f"`{arg}`: l2a-{config_name} has no setting {key}{hint} (`+{key}=...` adds a new key; "
             f"`l2a-{config_name} --cfg job` prints every setting)")


def _setting_names(node, prefix: str = "") -> list[str]:
    """Dotted names of every setting in a config (as a plain container), nested ones included."""
    names = []
    for key, value in node.items():
        names.append(f"{prefix}{key}")
        if isinstance(value, dict):
            names += _setting_names(value, f"{prefix}{key}.")
    return names


def hydra_app(config_name: str) -> Callable[[Callable], Callable[[], None]]:
    """Decorator: turn `task(cfg)` into a console-script `main()` over this config tree."""

    def decorate(task: Callable) -> Callable[[], None]:
        import hydra

        @functools.wraps(task)
        def guarded(cfg):
            try:
                return task(cfg)
            except UserError as err:
                fail(str(err))

        hydra_main = hydra.main(config_path="pkg://l2a_configs", config_name=config_name, version_base="1.3")(
            guarded
        )

        def main() -> None:
            check_python()
            check_empty_arguments(sys.argv[1:])
            check_group_overrides(sys.argv[1:])
            check_setting_overrides(config_name, sys.argv[1:])
            os.environ.setdefault("WANDB_MODE", "offline")  # never wait on the network by default
            hydra_main()

        main.task = task  # tests call the task directly with a composed config
        return main

    return decorate


def compose(config_name: str, overrides: list[str] | None = None):
    """The config an entry point would see for these overrides (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    check_group_overrides(overrides or [])
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="l2a_configs", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)
