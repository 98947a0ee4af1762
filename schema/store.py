"""The schema's nodes in Hydra's ConfigStore, where the YAML files of conf/ build on them:
``conf/config.yaml`` on ``schema_run``, each task file on ``schema/task/<type>``, each variant
file on ``schema/variant/<name>`` (added by ``variants.register_variant``)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from . import door
from .groups import ClassificationTask, InstructionTask
from .run import Run
from .variant import node


def add_run_and_tasks() -> None:
    store = ConfigStore.instance()
    store.store(name="schema_run", node=Run)
    store.store(group="schema/task", name="classification", node=ClassificationTask)
    store.store(group="schema/task", name="instruction", node=InstructionTask)


def add_variant(name: str, settings: type) -> None:
    """Variant ``name``'s node: the runner's keys and its ``settings``."""
    door.VARIANT_NODES[name] = node(name, settings)
    ConfigStore.instance().store(group="schema/variant", name=name, node=door.VARIANT_NODES[name])
