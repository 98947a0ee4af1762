"""Task data: the built-in smoke task, or GLUE from the hub or a local GLUE-format folder.

A task yields lists of examples (dicts of text fields plus ``label``); ``make_loader`` tokenizes
them once and pads each batch only to its own longest sequence.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from variants import ConfigError

from . import smoke_task

Example = dict[str, Any]
SOURCES = ("smoke", "glue")


def load_task(task: DictConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples for the task config, truncated to ``max_*_examples`` if set."""
    if task.source == "smoke":
        train, evaluation = smoke_task.generate(task.train_size, task.eval_size)
    elif task.source == "glue":
        train, evaluation = _load_glue_folder(task) if task.get("data_dir") else _load_glue_hub(task)
    else:
        raise ConfigError(f"task.source={task.source!r} is not supported; allowed: {', '.join(SOURCES)}")
    if task.get("max_train_examples"):
        train = train[: task.max_train_examples]
    if task.get("max_eval_examples"):
        evaluation = evaluation[: task.max_eval_examples]
    return train, evaluation


def _label(value: Any, task: DictConfig) -> int | float:
    if task.num_labels == 1:
        return float(value)
    if task.get("label_names") and isinstance(value, str) and not value.isdigit():
        return list(task.label_names).index(value)
    return int(value)


def _load_glue_hub(task: DictConfig) -> tuple[list[Example], list[Example]]:
    import datasets

    try:
        ds = datasets.load_dataset(task.hf_path, task.hf_name)
    except Exception as err:  # the hub raises many types (connection, offline mode, not found)
        raise ConfigError(
            f"task={task.name}: could not load {task.hf_path}/{task.hf_name} from the Hugging Face hub "
            f"({type(err).__name__}); without network pass task.data_dir=/path/to/glue_data/<TASK> "
            "(a folder with train.tsv and dev.tsv)"
        ) from None
    fields = [*task.text_fields, task.label_field]

    def rows(split: str) -> list[Example]:
        return [
            {**{f: row[f] for f in task.text_fields}, "label": _label(row[task.label_field], task)}
            for row in ds[split].select_columns(fields)
        ]

    return rows("train"), rows(task.eval_split)


def _load_glue_folder(task: DictConfig) -> tuple[list[Example], list[Example]]:
    folder = Path(task.data_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"task.data_dir={str(folder)!r} is not a directory; expected a GLUE task folder")
    return _read_tsv(folder / task.tsv.train, task), _read_tsv(folder / task.tsv.eval, task)


def _read_tsv(path: Path, task: DictConfig) -> list[Example]:
    """Rows of a GLUE TSV with a header line, columns picked by name."""
    if not path.is_file():
        raise ConfigError(f"task.data_dir: {path.name} is missing in {str(path.parent)!r}")
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        wanted = [*task.text_fields, task.label_field]
        absent = [c for c in wanted if c not in header]
        if absent:
            raise ConfigError(
                f"task.data_dir: {str(path)!r} has columns {header}, missing {absent} "
                f"(task.text_fields / task.label_field)"
            )
        index = {c: header.index(c) for c in wanted}
        examples = []
        for line_no, row in enumerate(reader, start=2):
            if len(row) < len(header):
                raise ConfigError(f"task.data_dir: {str(path)!r} line {line_no} has {len(row)} columns, expected {len(header)}")
            example = {f: row[index[f]] for f in task.text_fields}
            example["label"] = _label(row[index[task.label_field]], task)
            examples.append(example)
    return examples


def make_loader(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    text_fields: list[str],
    max_length: int,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    texts = [[ex[f] for ex in examples] for f in text_fields]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    features = [
        {**{key: values[i] for key, values in encoded.items()}, "labels": ex["label"]}
        for i, ex in enumerate(examples)
    ]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        features,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
