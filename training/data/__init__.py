"""Task data: which examples a run trains and evaluates on, and the loaders that batch them.

``load_task`` reads ``task.source``: ``smoke`` (generated offline, ``synthetic.py``) and
``glue`` (the hub or a local GLUE folder, ``glue.py``) are classification tasks; ``sft_smoke``,
``jsonl`` and ``hub`` are instruction tuning for a causal LM (``sft.py``). Every task then gets
the same treatment (``examples.py``): a ``val`` share held out of its training set when
``task.val_fraction`` is set (stratified by class for classification, at random for instruction
tuning), and the ``max_*_examples`` caps. ``glue.make_loader`` batches a classification task,
``sft.make_train_loader`` / ``sft.make_eval_loader`` an instruction-tuning one.
"""

from __future__ import annotations

from omegaconf import DictConfig

from schema.groups import SFT_SOURCES

from . import glue, sft
from .examples import Example, LengthGroupedBatches, Splits, hold_out_and_cap, training_batches
from .glue import make_loader, split_validation
from .synthetic import generate_smoke

__all__ = ["Example", "LengthGroupedBatches", "Splits", "load_task", "make_loader", "split_validation",
           "training_batches"]


def load_task(task: DictConfig, seed: int = 0) -> Splits:
    """(train, {eval name: examples}) for the task config, ``main`` evaluation first, then
    ``val`` when ``task.val_fraction`` is set (carved out with ``seed``), each truncated to
    ``max_*_examples`` if set."""
    if task.source in SFT_SOURCES:
        train, evaluations = sft.load(task)
        return hold_out_and_cap(task, train, evaluations, lambda examples, fraction: sft.random_split(
            examples, fraction, seed))
    if task.source == "smoke":
        train, main = generate_smoke(task.train_size, task.eval_size)
        evaluations = {"main": main}
    else:  # glue: the schema allows no other source (schema.groups.CLASSIFICATION_SOURCES)
        train, evaluations = glue.load(task)
    return hold_out_and_cap(task, train, evaluations, lambda examples, fraction: split_validation(
        examples, fraction, seed, task.num_labels))
