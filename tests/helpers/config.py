"""Configs as Hydra composes them: the schema's defaults (``schema/``), then the files of ``conf/``,
which hold only what differs from them; for tests that take one group of a run's config."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import variants  # noqa: F401  registers each variant's schema node, which conf/variant/*.yaml build on

CONF = Path(__file__).resolve().parents[2] / "conf"


def composed(*overrides: str) -> DictConfig:
    """The whole config of ``python run.py <overrides>``."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def task_config(name: str, **values) -> DictConfig:
    """``task=<name>``'s group, with ``values`` set (e.g. ``data_dir``)."""
    task = composed(f"task={name}").task
    for key, value in values.items():
        task[key] = value
    return task
