"""Sweep job dir names, and a Hydra callback that writes one summary of a multirun: every job,
its status, its metric."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import rundir

log = logging.getLogger(__name__)


MAX_VALUE = 24  # longer values, and paths, appear in a job's dir name as a hash of themselves
MAX_NAME = 96   # a longer name is cut there and ends with a hash of the whole


def job_dirname(overrides: list[str], exclude: list[str]) -> str:
    """A sweep job's dir name after its number (``conf/config.yaml``, ``hydra.sweep.subdir``): its
    overrides, ``key=value`` sorted and joined by commas without the excluded keys (Hydra's
    ``override_dirname``, which short names match); a path or a long value
    becomes ``#`` and 6 hex digits of its hash, and odd characters become ``_``. A name longer
    than ``MAX_NAME`` uses each key's last part (``trainer.lr`` -> ``lr``), and if still too long
    is cut after a whole override and ends with a hash of the full name. The same overrides give
    the same name (``skip_completed`` finds the dir again); the full ones are in its ``.hydra/``."""
    pairs = []
    for override in sorted(overrides):
        key, _, value = override.partition("=")
        if key.lstrip("+~") in exclude:
            continue
        if "/" in value or len(value) > MAX_VALUE:
            value = "#" + _digest(value, 6)
        pairs.append((key, re.sub(r"[^A-Za-z0-9._+#-]", "_", value)))
    name = ",".join(f"{k}={v}" for k, v in pairs)
    if len(name) <= MAX_NAME:
        return name
    short = [f"{k.lstrip('+~').rsplit('.', 1)[-1]}={v}" for k, v in pairs]
    if len(",".join(short)) <= MAX_NAME:
        return ",".join(short)
    kept = []
    for part in short:
        if len(",".join([*kept, part])) > MAX_NAME - 10:
            break
        kept.append(part)
    return ",".join([*kept, f"#{_digest(name, 8)}"])


def _digest(text: str, digits: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:digits]


OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job that started (a folder with Hydra's ``.hydra``, at any depth), in
    job-number order."""
    rows = []
    jobs = [p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir() and p.parent != sweep_dir
            and p.parent.parent.name != ".hydra"]
    for job in sorted(jobs, key=lambda p: int(p.name.split("_", 1)[0]) if p.name.split("_", 1)[0].isdigit() else 0):
        try:
            rundir.check_free(job)
            summary = rundir.read_summary(job) or {}
            status = summary.get("status", "missing")  # missing: the job died without writing one
        except rundir.InUse:  # another process runs it now (a second worker on the sweep): its summary is not final
            summary, status = {}, "running"
        except rundir.UnreadableSummary as err:
            summary, status = {"error": str(err)}, "unreadable"  # cut short (a full disk, a kill): not completed
        metric = summary.get("main_metric")
        rows.append({
            "job": str(job.relative_to(sweep_dir)),
            "status": status,
            "metric": metric,
            "value": summary.get("eval", {}).get(metric) if status == "completed" else None,
            "error": summary.get("error"),
        })
    return rows


def write_summary(sweep_dir: Path) -> None:
    """``sweep_summary.json`` and ``sweep_summary.md``: every job dir's status and metric."""
    if not sweep_dir.is_dir():
        return
    rows = job_rows(sweep_dir)
    rundir.write_text(sweep_dir / "sweep_summary.json", json.dumps(rows, indent=2) + "\n")
    lines = ["| job | status | metric | value | error |", "|---|---|---|---|---|"]
    for row in rows:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(f"| {row['job']} | {row['status']} | {row['metric'] or ''} | {value} | {row['error'] or ''} |")
    rundir.write_text(sweep_dir / "sweep_summary.md", "\n".join(lines) + "\n")
    failed = [row["job"] for row in rows if row["status"] != "completed"]
    log.info("sweep summary: %d of %d jobs completed%s; %s", len(rows) - len(failed), len(rows),
             f", not completed: {', '.join(failed)}" if failed else "", sweep_dir / "sweep_summary.md")


class SweepSummary(Callback):
    """Writes the sweep summary at the end (run.py writes it too when SIGTERM stops the sweep)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(config.hydra.sweep.dir))
