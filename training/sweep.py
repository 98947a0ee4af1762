"""A Hydra callback that writes one summary of a multirun: every job, its status, its metric."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from . import rundir

log = logging.getLogger(__name__)


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job dir (a folder with Hydra's ``.hydra``), in job-number order."""
    rows = []
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()]
    for job in sorted(jobs, key=lambda p: int(p.name.split("_", 1)[0]) if p.name.split("_", 1)[0].isdigit() else 0):
        try:
            summary = rundir.read_summary(job) or {}
            status = summary.get("status", "missing")  # missing: the job died without writing one
        except rundir.UnreadableSummary as err:
            summary, status = {"error": str(err)}, "unreadable"  # cut short (a full disk, a kill): not completed
        metric = summary.get("main_metric")
        rows.append({
            "job": job.name,
            "status": status,
            "metric": metric,
            "value": summary.get("eval", {}).get(metric) if status == "completed" else None,
            "error": summary.get("error"),
        })
    return rows


class SweepSummary(Callback):
    """Writes ``sweep_summary.json`` and ``sweep_summary.md`` into the sweep dir at the end."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
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
