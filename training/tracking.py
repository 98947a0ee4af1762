"""Where metrics go: ``metrics.jsonl`` in the run dir always, and Weights & Biases when enabled.

Training never depends on W&B: any error it raises is logged as a warning once and W&B is
switched off for the rest of the run, while ``metrics.jsonl`` keeps every record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import rundir
from .metrics import Predictions
from .rundir import METRICS

log = logging.getLogger(__name__)


class Tracker:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str = "offline",
        project: str = "lora-variants",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        resume_id: str | None = None,
        resumed: bool = False,
    ) -> None:
        # a resumed run appends (its file was cut back to the checkpoint); a new one starts the file afresh,
        # also in a run dir an unfinished run left behind
        self._metrics_file = (run_dir / METRICS).open("a" if resumed else "w", encoding="utf-8")
        self._run_dir = run_dir
        # a resumed run keeps its earlier evaluations (cut back to its checkpoint); a new one starts empty
        self._predictions = rundir.read_predictions(run_dir) if resumed else {}
        self.wandb_run = None
        if mode != "disabled":
            self._guard("init", lambda: self._init_wandb(run_dir, config, mode, project, entity, group, name, tags,
                                                          resume_id))

    def _init_wandb(self, run_dir, config, mode, project, entity, group, name, tags, resume_id) -> None:
        import wandb

        self.wandb_run = wandb.init(
            id=resume_id,  # a resumed run continues its W&B run
            resume="allow" if resume_id else None,
            project=project,
            entity=entity,
            dir=str(run_dir),
            mode=mode,
            group=group,
            name=name,
            tags=tags,
            config=config,
            job_type="train",
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True, disable_git=True),
        )

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as err:  # noqa: BLE001  (a tracker failure must never stop training)
            log.warning("W&B %s failed (%s: %s); continuing without W&B", what, type(err).__name__, err)
            self.wandb_run = None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step``) to metrics.jsonl and send it to W&B."""
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self.wandb_run is not None:
            run = self.wandb_run
            data = {k: v for k, v in record.items() if k != "step"}
            self._guard("log", lambda: run.log(data, step=record["step"]))

    def log_predictions(self, step: int, eval_set: str, predictions: Predictions) -> None:
        """Add one evaluation's per-example scores to ``predictions.npz`` (the run dir only)."""
        self._predictions.update(predictions.arrays(eval_set, step))
        rundir.write_predictions(self._run_dir, self._predictions)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            run = self.wandb_run
            self._guard("summary", lambda: run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        self._metrics_file.close()
        if self.wandb_run is not None:
            run = self.wandb_run
            self._guard("finish", lambda: run.finish(exit_code=exit_code))
            self.wandb_run = None


class NullTracker:
    """Where the metrics of processes other than rank 0 go: nowhere."""

    wandb_run = None

    def log(self, record: dict[str, Any]) -> None:
        pass

    def log_predictions(self, step: int, eval_set: str, predictions: Predictions) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
