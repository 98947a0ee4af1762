"""The top level of the config: the run's own keys, and the groups beneath it.

``variant`` and ``task`` are typed by the file a run picks (``conf/variant/<name>.yaml`` builds on
that variant's ``Settings``, a task file on ``ClassificationTask`` or ``InstructionTask``), so
they are open here and checked by their own schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .fields import knob
from .groups import Model, Tracking, Trainer


@dataclass
class Run:
    variant: Any = None
    model: Model = knob(Model(), "the pretrained model (conf/model/)")
    trainer: Trainer = knob(Trainer(), "the training loop (conf/trainer/default.yaml)")
    task: Any = None
    tracking: Tracking = knob(Tracking(), "Weights & Biases (conf/tracking/wandb.yaml)")

    rank: int = knob(8, "r of every adapter (rank=8,16,64 -m sweeps it)", within=">= 1")
    alpha: float = knob(16.0, "α: adapters scale B·A by α/r (α/√r with variant.scaling=rslora)", within="> 0")
    budget: int | None = knob(None, "trainable parameters without the head: each adapter's rank is chosen to come "
                              "closest (AdaLoRA: its final rank); rank is then ignored", within=">= 1")
    adapter_dropout: float = knob(0.1, "dropout on the adapter path of the LoRA-family variants (their "
                                  "variant.dropout)", within="[0, 1)")
    seed: int = knob(0, "seeds the initialisation, the data order and any held-out split")
    init_from: str | None = knob(None, "a finished run dir (or its adapter.safetensors) whose adapter weights start "
                                 "this run's (the LoRA paper's MNLI warm start)")
    skip_completed: bool = knob(False, "a run dir that already holds a completed summary is not run again, and one "
                                "cut off after a checkpoint continues from it (finish a cut-off sweep: the same "
                                "command, the same hydra.sweep.dir); in a sweep, a job another process is running "
                                "is skipped (a second worker on the sweep)")
    resume: bool = knob(False, "continue the run in hydra.run.dir from its checkpoint (or: python run.py "
                        "resume=<run dir>)")
    resume_changes: list[str] = knob([], "keys a resume may change from the checkpoint's config, e.g. "
                                     "[trainer.epochs]; any other difference refuses the resume")

    # Keys of the studies in conf/experiment/: a rate grid per method, and which point of it a job runs.
    glue_dir: str | None = knob(None, "the GLUE distribution's folder (a study's task.data_dir is under it)")
    lr_grid: dict | None = knob(None, "a study's rates: method -> point -> rate")
    lr_grid_of: str | None = knob(None, "which method's grid of lr_grid a job takes (default: the variant's)")
    lr_point: str | None = knob(None, "which point of that grid a job runs")
    max_epochs: int | None = knob(None, "a study's epoch budget (its trainer.epochs)", within=">= 1")
    steps: dict | None = knob(None, "a study's step budget per task name")
