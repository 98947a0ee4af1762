"""What a resumed run may differ in from the run that wrote its checkpoint.

A checkpoint carries the resolved config it was trained with (``run_record``). A resume composes
its config again from the command line; any key whose value differs, other than the few that
cannot change what trains (``IGNORED``), refuses the resume in one line naming the keys, unless
the user lists it in ``resume_changes`` (a deliberate change: a longer schedule, say). Accepted
changes are recorded, with the step they took effect at, in the checkpoint and in summary.json
(``resumes``), so the run dir keeps saying what trained it.
"""

from __future__ import annotations

from typing import Any

from schema import ConfigError

# Keys that never change what trains: how the run was started and where it is tracked.
IGNORED = ("resume", "resume_changes", "skip_completed", "tracking")


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.lr": 1e-4, ...}``: every leaf of a nested dict under its dotted key (lists and
    empty dicts are leaves)."""
    if not isinstance(config, dict) or not config:
        return {prefix: config} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [old value, new value]}`` for every leaf that differs (a missing leaf is None)."""
    before, after = flatten(old), flatten(new)
    keys = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in keys
            if before.get(k) != after.get(k) and k.split(".")[0] not in IGNORED}


def check(old: dict[str, Any], new: dict[str, Any], allowed: list[str], step: int) -> dict[str, Any] | None:
    """The record of an accepted resume's changes (None when nothing changed); ``ConfigError``
    naming every key that changed without being listed in ``allowed`` (``resume_changes``)."""
    changed = changes(old, new)
    refused = [k for k in changed if not any(k == a or k.startswith(f"{a}.") for a in allowed)]
    if refused:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"resume: the config differs from the one the checkpoint was trained with in {shown}{more}; "
            f"resume with the run's own settings (python run.py resume=<run dir>), or allow the change "
            f"deliberately with resume_changes=[{','.join(refused)}]")
    return {"step": step, "changed": changed} if changed else None
