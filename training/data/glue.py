"""Classification tasks: GLUE from the hub or a local GLUE-format folder, a stratified validation
share, and the loader of any classification task (the smoke task's too).

A GLUE task yields a training list and named evaluation lists (``main`` first; MNLI adds
``mismatched``) of examples: dicts of the task's text fields plus ``label``. With
``task.val_fraction`` a seeded, stratified ``val`` set is carved out of the training set for
model selection, and ``main`` (GLUE's dev set) is then only reported, as a test set. ``make_loader``
tokenizes them once (sentence pairs as pairs) and pads each batch only to its own longest
sequence; evaluation loaders sort by length (and say how, so predictions come back in order).
With ``trainer.group_by_length`` a training epoch's batches hold examples of similar length
(``LengthGroupedBatches``), which pads less.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from schema import ConfigError

from ..distributed import Context
from .examples import Example, Splits, batch_loader, hub_dataset


def load(task: DictConfig) -> Splits:
    """(train, {eval name: examples}) of a GLUE task: from ``task.data_dir`` when set, else the hub."""
    return _load_glue_folder(task) if task.get("data_dir") else _load_glue_hub(task)


def split_validation(train: list[Example], fraction: Any, seed: int, num_labels: int
                     ) -> tuple[list[Example], list[Example]]:
    """(what trains, validation): ``fraction`` of ``train`` held out, stratified by class (by
    label quintile for regression) and drawn with ``seed``; the two are disjoint and keep the
    file's order."""
    labels = np.array([ex["label"] for ex in train])
    strata = labels if num_labels > 1 else np.digitize(labels, np.quantile(labels, [0.2, 0.4, 0.6, 0.8]))
    classes, counts = np.unique(strata, return_counts=True)
    n_val = math.ceil(fraction * len(train))
    if len(classes) > n_val or (counts < 2).any() or n_val >= len(train):
        raise ConfigError(
            f"task.val_fraction={fraction} would leave a class empty on one side (classes {classes.tolist()} have "
            f"{counts.tolist()} of {len(train)} training examples, {n_val} to hold out); allowed: a fraction that "
            "leaves every class at least one example in both splits"
        )
    kept, held_out = train_test_split(np.arange(len(train)), test_size=n_val, random_state=seed, stratify=strata)
    for side, name in ((kept, "training"), (held_out, "validation")):
        if len(np.unique(strata[side])) < len(classes):
            raise ConfigError(f"task.val_fraction={fraction} leaves a class out of the {name} split; "
                              "allowed: a fraction that keeps every class on both sides")
    return [train[i] for i in sorted(kept)], [train[i] for i in sorted(held_out)]


def _label(value: Any, task: DictConfig, where: str) -> int | float:
    """A class id in [0, num_labels) (or a finite float for regression); GLUE TSVs spell some
    classes by name. Anything else is a ``ConfigError`` naming ``where`` (file and line)."""
    names = list(task.label_names) if task.get("label_names") else None
    allowed = (names or f"integers 0 to {task.num_labels - 1}") if task.num_labels > 1 else "finite numbers"
    try:
        if task.num_labels == 1:
            label = float(value)
            if math.isfinite(label):
                return label
        elif names and isinstance(value, str) and not value.isdigit():
            return names.index(value)
        elif 0 <= (label := int(value)) < task.num_labels:
            return label
    except ValueError:
        pass
    raise ConfigError(f"task.data_dir: {where} has label {value!r}; allowed: {allowed}")


def _load_glue_hub(task: DictConfig) -> Splits:
    ds = hub_dataset(task, task.hf_name, f"{task.hf_path}/{task.hf_name}",
                     "pass task.data_dir=/path/to/glue_data/<TASK> (a folder with train.tsv and dev.tsv)")
    fields = [*task.text_fields, task.label_field]

    def rows(split: str) -> list[Example]:
        return [
            {**{f: row[f] for f in task.text_fields}, "label": _label(row[task.label_field], task, split)}
            for row in ds[split].select_columns(fields)
        ]

    return rows("train"), {name: rows(split) for name, split in task.eval_splits.items()}


def _load_glue_folder(task: DictConfig) -> Splits:
    folder = Path(task.data_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"task.data_dir={str(folder)!r} is not a directory; expected a GLUE task folder")
    evaluations = {name: _read_tsv(folder / file, task) for name, file in task.tsv.eval.items()}
    return _read_tsv(folder / task.tsv.train, task), evaluations


def _read_tsv(path: Path, task: DictConfig) -> list[Example]:
    """Rows of a GLUE TSV, columns picked by name from its header line (or from
    ``task.tsv.columns`` for headerless files such as CoLA's)."""
    if not path.is_file():
        raise ConfigError(f"task.data_dir: {path.name} is missing in {str(path.parent)!r}")
    layout = task.tsv
    text_columns = list(layout.get("text_columns") or task.text_fields)
    label_column = layout.get("label_column") or task.label_field
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(_text_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = list(layout.columns) if layout.get("columns") else next(reader, [])
    first_line = 1 if layout.get("columns") else 2
    wanted = [*text_columns, label_column]
    absent = [c for c in wanted if c not in header]
    if absent:
        raise ConfigError(
            f"task.data_dir: {str(path)!r} has columns {header}, missing {absent} "
            f"(task.tsv.text_columns / task.tsv.label_column)"
        )
    index = [header.index(c) for c in wanted]
    examples = []
    for line_no, row in enumerate(reader, start=first_line):
        if len(row) != len(header) or any(row[i] == "" for i in index):
            if layout.get("skip_malformed"):
                continue
            empty = [header[i] for i in index if i < len(row) and row[i] == ""]
            problem = f"an empty {empty[0]!r}" if len(row) == len(header) else f"{len(row)} columns, expected {len(header)}"
            raise ConfigError(f"task.data_dir: {str(path)!r} line {line_no} has {problem}")
        example = {field: row[i] for field, i in zip(task.text_fields, index)}
        example["label"] = _label(row[index[-1]], task, f"{path.name} line {line_no}")
        examples.append(example)
    if not examples:
        raise ConfigError(f"task.data_dir: {str(path)!r} has no examples (only a header, or nothing); "
                          "allowed: a GLUE TSV with at least one row")
    return examples


def _text_lines(path: Path) -> io.StringIO:
    """The file's lines as UTF-8 (a leading byte-order mark dropped, as GLUE's MRPC files have one);
    bytes that are not UTF-8 are a ``ConfigError`` naming the file and line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"task.data_dir: {str(path)!r} line {line} is not UTF-8 (byte {raw[err.start]:#04x}); "
                          "allowed: UTF-8 text") from None
    return io.StringIO(text, newline="")  # as open(newline=""): only the csv module splits rows


def make_loader(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    text_fields: list[str],
    max_length: int,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    shard: Context | None = None,
    group_by_length: bool = False,
) -> DataLoader:
    """Batches of ``batch_size`` (the global batch); with ``shard``, this process's slice of
    each global batch, in the same order on every process; ``group_by_length`` (training)
    batches examples of similar length together."""
    texts = [[ex[f] for ex in examples] for f in text_fields]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    features = [
        {**{key: values[i] for key, values in encoded.items()}, "labels": ex["label"]}
        for i, ex in enumerate(examples)
    ]
    order = None
    if not shuffle:  # evaluation: batches of similar length pad little; ``example_order`` undoes the sort
        order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")
        features = [features[i] for i in order]
    loader = batch_loader(features, batch_size, DataCollatorWithPadding(tokenizer), shuffle, seed, shard,
                          group_by_length)
    loader.example_order = order  # position in ``examples`` of each example the loader yields (None: as given)
    return loader
