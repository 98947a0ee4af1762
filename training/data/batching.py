"""The index batches of a training epoch: plain shuffling, or batches of similar length.

Both draw only from the loader's generator, so the trainer's data position (the generator's
state at an epoch's start, and the batches done since) replays an epoch exactly on resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, RandomSampler


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
