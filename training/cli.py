"""Command-line checks that must happen before Hydra composes the config."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from schema import ConfigError

# A plain choice or a comma-separated sweep of plain choices; Hydra's sweep functions
# (range(), glob(), choice()) and lists are left for Hydra to expand.
_PLAIN_CHOICES = re.compile(r"[\w.\-]+(,[\w.\-]+)*")


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Fail with one line when ``group=choice`` names a config file that does not exist.

    Hydra's own message for this spans several lines and hints at stack traces; this one names
    the key and the allowed values.
    """
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    for arg in overrides:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups or not _PLAIN_CHOICES.fullmatch(value):
            continue
        allowed = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in allowed:
                raise ConfigError(f"{key}={choice!r} is not a known {key}; allowed: {', '.join(allowed)}")


# What an optional path needs beyond the base install: {module: pip name}, and the extra of
# pyproject.toml that installs it.
LAUNCHERS = {
    "local": ({"hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher"}, "scale"),
    "slurm": ({"hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher", "submitit": "submitit"}, "scale"),
}


def require(modules: dict[str, str], needed_by: str, extra: str) -> None:
    """One line naming every package ``needed_by`` needs that does not import, and the install."""
    missing = []
    for module, pip_name in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise ConfigError(f"{needed_by} needs {', '.join(missing)}, which is not installed; "
                          f"pip install -e \".[{extra}]\" (or pip install {' '.join(missing)})")


def check_launcher(overrides: list[str]) -> None:
    """``hydra/launcher=local|slurm`` without its plugin: one line, before Hydra's traceback."""
    for arg in overrides:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in LAUNCHERS:
            modules, extra = LAUNCHERS[value]
            require(modules, f"hydra/launcher={value}", extra)
