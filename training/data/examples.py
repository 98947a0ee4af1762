"""What every task's data shares: the example and split types, the validation share and the
example caps every loader applies alike, the hub's loading error, and the loader itself (how
features become batches: plain shuffling, or batches of similar length; both draw only from the
loader's generator, so the trainer's data position, the generator's state at an epoch's start and
the batches done since, replays an epoch exactly on resume).

A task yields a training list and named evaluation lists (``main`` first) of examples, dicts of
the task's fields. Each kind of task turns its examples into token features its own way
(``glue.py``, ``sft.py``); ``batch_loader`` then batches those features the same way for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from schema import ConfigError

from ..distributed import Context, ShardedBatches

Example = dict[str, Any]
Splits = tuple[list[Example], dict[str, list[Example]]]


def hold_out_and_cap(task: DictConfig, train: list[Example], evaluations: dict[str, list[Example]],
                     split: Callable[[list[Example], Any], tuple[list[Example], list[Example]]]) -> Splits:
    """``val`` carved out of ``train`` by ``split(train, task.val_fraction)`` when
    ``task.val_fraction`` is set, then every set cut to ``task.max_train_examples`` /
    ``task.max_eval_examples`` if set."""
    if task.get("val_fraction") is not None:
        train, evaluations["val"] = split(train, task.val_fraction)
    if task.get("max_train_examples"):
        train = train[: task.max_train_examples]
    if task.get("max_eval_examples"):
        evaluations = {name: examples[: task.max_eval_examples] for name, examples in evaluations.items()}
    return train, evaluations


def hub_dataset(task: DictConfig, name: str | None, what: str, offline: str) -> Any:
    """``datasets.load_dataset(task.hf_path, name)``; a failure (the hub raises many types:
    connection, offline mode, not found) is a ``ConfigError`` naming ``what`` and what to do
    ``offline``."""
    import datasets

    try:
        return datasets.load_dataset(task.hf_path, name)
    except Exception as err:  # noqa: BLE001  (any failure of the hub is the same one-line error)
        raise ConfigError(f"task={task.name}: could not load {what} from the Hugging Face hub "
                          f"({type(err).__name__}); without network {offline}") from None


def batch_loader(features: list[dict[str, Any]], batch_size: int, collate_fn: Callable[[list], Any], shuffle: bool,
                 seed: int | None = None, shard: Context | None = None, group_by_length: bool = False) -> DataLoader:
    """Batches of ``batch_size`` features (the global batch). ``shuffle`` (training): an epoch
    drawn from a generator seeded with ``seed`` (``group_by_length``: batches of similar length,
    ``LengthGroupedBatches``); else the features in order. With ``seed`` the loader carries that generator
    (its epochs draw from it alone); with ``shard``, each process gets its slice of every global
    batch, in the same order on every process."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if shuffle:
        batches = training_batches([len(f["input_ids"]) for f in features], batch_size, generator, group_by_length)
    else:
        batches = BatchSampler(SequentialSampler(features), batch_size, drop_last=False)
    if shard is not None and shard.enabled:
        batches = ShardedBatches(batches, shard)
    return DataLoader(features, batch_sampler=batches, generator=generator, collate_fn=collate_fn)


class LengthGroupedBatches(BatchSampler):
    """A shuffled epoch in batches of similar length, as Hugging Face's ``group_by_length``:
    a random permutation is cut into groups of ``group`` batches, each group is sorted by length
    (longest first) and cut into batches, and the batches of the whole epoch are then shuffled.
    Every example comes once per epoch; the order depends only on ``generator``'s state at the
    epoch's start, so a seed fixes it and a resumed run redraws it exactly."""

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 50) -> None:
        super().__init__(RandomSampler(range(len(lengths)), generator=generator), batch_size, drop_last=False)
        self.lengths, self.generator, self.group = lengths, generator, group

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)  # one draw from the generator: a permutation of the examples
        span = self.group * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.lengths.__getitem__, reverse=True)  # stable
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for k in torch.randperm(len(batches), generator=self.generator).tolist():  # a second draw: the batch order
            yield batches[k]


def training_batches(lengths: list[int], batch_size: int, generator: torch.Generator, group_by_length: bool
                     ) -> BatchSampler:
    """The index batches of a training epoch: plain shuffling, or grouped by length."""
    if group_by_length:
        return LengthGroupedBatches(lengths, batch_size, generator)
    return BatchSampler(RandomSampler(range(len(lengths)), generator=generator), batch_size, drop_last=False)
