"""Command-line checks that must happen before Hydra composes the config."""

from __future__ import annotations

import re
from pathlib import Path

from variants import ConfigError

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
