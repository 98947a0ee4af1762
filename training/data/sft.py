"""Causal-LM task data: instruction/response pairs, tokenized so the loss falls on the response.

Sources (``task.source``): ``sft_smoke``, generated offline (``synthetic.py``);
``jsonl``, files with one JSON object per line (``task.train_file``, ``task.eval_files``);
``hub``, a Hugging Face dataset by name (``task.hf_path``, ``task.hf_name``, ``task.splits``).
``task.prompt_field`` and ``task.response_field`` name the two fields in the last two.

Each example becomes ``prompt ids + response ids``: the prompt formatted by the tokenizer's
chat template (a user turn and the assistant's header), the response as the template closes
the assistant's turn (for SmolLM2: ``"9<|im_end|>\\n"``); without a template, the raw prompt and
the response followed by the EOS token. Prompt and response are tokenized apart, as generation
sees them: the model is trained to continue exactly the ids it is given at evaluation.
``labels`` are the response ids, and -100 (ignored by the loss) on the prompt and on padding.
Batches are padded to their longest sequence; with ``task.packing`` whole examples are packed
into rows of up to ``model.max_length`` tokens, with position ids restarting at each example,
from which transformers builds a mask that keeps the examples from attending to each other.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from schema import ConfigError

from ..distributed import Context
from .examples import Example, Splits, batch_loader, hub_dataset
from .synthetic import generate_sft_smoke

log = logging.getLogger(__name__)

IGNORE = -100  # the label the loss skips
# An example here: {"prompt": str, "response": str, "where": "train.jsonl line 3"}


def load(task: DictConfig) -> Splits:
    """(train, {eval name: examples}), ``main`` first (``load_task`` then holds out ``val``, a
    seeded random share of the training set: ``random_split``)."""
    if task.source == "sft_smoke":
        train, main = generate_sft_smoke(task.train_size, task.eval_size)
        train = [{**ex, "where": f"sft_smoke train example {i + 1}"} for i, ex in enumerate(train)]
        evaluations = {"main": [{**ex, "where": f"sft_smoke eval example {i + 1}"} for i, ex in enumerate(main)]}
    elif task.source == "jsonl":
        train = read_jsonl(task.train_file, task, "task.train_file")
        evaluations = {name: read_jsonl(path, task, f"task.eval_files.{name}") for name, path in task.eval_files.items()}
    else:  # hub: the schema allows no other source (schema.groups.SFT_SOURCES)
        train, evaluations = _load_hub(task)
    if "main" not in evaluations:
        raise ConfigError(f"task={task.name}: the evaluation sets {list(evaluations)} have no 'main'")
    return train, {"main": evaluations.pop("main"), **evaluations}


def random_split(train: list[Example], fraction: Any, seed: int) -> tuple[list[Example], list[Example]]:
    """(what trains, validation): ``fraction`` of ``train`` held out at random with ``seed``;
    both keep the file's order."""
    n_val = max(1, round(fraction * len(train)))
    if n_val >= len(train):
        raise ConfigError(f"task.val_fraction={fraction} leaves no training example of {len(train)}")
    held_out = set(random.Random(seed).sample(range(len(train)), n_val))
    return ([ex for i, ex in enumerate(train) if i not in held_out],
            [ex for i, ex in enumerate(train) if i in held_out])


def read_jsonl(path: Any, task: DictConfig, key: str) -> list[Example]:
    """The examples of a JSONL file; a bad line is a ``ConfigError`` naming the file and line."""
    if not path:
        raise ConfigError(f"{key} is not set; allowed: the path of a JSONL file with "
                          f"{task.prompt_field!r} and {task.response_field!r} fields")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}={str(file)!r} is not a file; allowed: the path of a JSONL file with "
                          f"{task.prompt_field!r} and {task.response_field!r} fields")
    examples = []
    try:
        lines = file.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON text may hold U+2028
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}={str(file)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{file.name} line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {str(file)!r} line {line_no} is not valid JSON ({err.msg}); allowed: one "
                              f"JSON object per line with fields {[task.prompt_field, task.response_field]}") from None
        examples.append(_example(record, task, where, f"{key}: {str(file)!r} line {line_no}"))
    if not examples:
        raise ConfigError(f"{key}={str(file)!r} has no examples")
    return examples


def _example(record: Any, task: DictConfig, where: str, context: str) -> Example:
    fields = (task.prompt_field, task.response_field)
    if not isinstance(record, dict):
        raise ConfigError(f"{context} is a JSON {type(record).__name__}; allowed: an object with fields {list(fields)}")
    for field, key in zip(fields, ("task.prompt_field", "task.response_field")):
        if not isinstance(record.get(field), str):
            found = "missing" if field not in record else f"a {type(record[field]).__name__}, not text"
            raise ConfigError(f"{context}: field {field!r} ({key}) is {found}; fields there: {sorted(record)}")
    return {"prompt": record[task.prompt_field], "response": record[task.response_field], "where": where}


def _load_hub(task: DictConfig) -> Splits:
    ds = hub_dataset(task, task.get("hf_name"), task.hf_path, "use task.source=jsonl")

    def rows(name: str, split: str) -> list[Example]:
        if split not in ds:
            raise ConfigError(f"task.splits.{name}={split!r} is not a split of {task.hf_path}; allowed: {list(ds)}")
        return [_example(row, task, f"{split} row {i + 1}", f"task={task.name}: {task.hf_path} {split} row {i + 1}")
                for i, row in enumerate(ds[split])]

    splits = dict(task.splits)
    return rows("train", splits.pop("train")), {name: rows(name, split) for name, split in splits.items()}


@dataclass(frozen=True)
class PromptFormat:
    """How an example becomes text: through the tokenizer's chat template or as given."""

    tokenizer: PreTrainedTokenizerBase
    chat: bool
    system_prompt: str | None = None
    open_response: bool = False  # the response as written, without what ends the turn (a model's own answer, maybe cut)

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]

    def prompt_text(self, prompt: str) -> str:
        """What the model reads before it answers."""
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)

    def response_text(self, prompt: str, response: str) -> str:
        """What the model learns to write after ``prompt_text``: the response and what ends it
        (with ``open_response``, the response alone)."""
        if self.open_response:
            return response
        if not self.chat:
            return response + (self.tokenizer.eos_token or "")
        head = self.prompt_text(prompt)
        whole = self.tokenizer.apply_chat_template(
            [*self._messages(prompt), {"role": "assistant", "content": response}], tokenize=False)
        if not whole.startswith(head):
            raise ConfigError("task.chat_template: this tokenizer's template does not write the assistant's turn "
                              "after the prompt it formats for generation; allowed: task.chat_template=false")
        return whole[len(head):]


def prompt_format(tokenizer: PreTrainedTokenizerBase, task: DictConfig) -> PromptFormat:
    """``task.chat_template``: ``auto`` uses the tokenizer's when it has one; ``true`` requires it."""
    wanted = task.get("chat_template", "auto")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if wanted is True and not has_template:
        raise ConfigError("task.chat_template=true but this model's tokenizer has no chat template; "
                          "allowed: auto or false (the prompt is then used as written)")
    return PromptFormat(tokenizer, chat=has_template and wanted is not False, system_prompt=task.get("system_prompt"))


def encode(examples: list[Example], fmt: PromptFormat, max_length: int) -> list[dict[str, Any]]:
    """Token ids of each example: ``input_ids`` (prompt then response), ``labels`` (-100 on the
    prompt), ``prompt_len``. A prompt that leaves no room for a response is a ``ConfigError``;
    a response that does not fit is cut at ``max_length`` (and counted in the log)."""
    tokenizer = fmt.tokenizer
    prompts = tokenizer([fmt.prompt_text(ex["prompt"]) for ex in examples], add_special_tokens=not fmt.chat)["input_ids"]
    responses = tokenizer([fmt.response_text(ex["prompt"], ex["response"]) for ex in examples],
                          add_special_tokens=False)["input_ids"]
    features, cut = [], 0
    for ex, prompt, response in zip(examples, prompts, responses):
        if len(prompt) >= max_length:
            raise ConfigError(f"{ex['where']}: the prompt alone is {len(prompt)} tokens, model.max_length={max_length}; "
                              "allowed: prompts shorter than model.max_length (raise it, or shorten the prompt)")
        kept = response[: max_length - len(prompt)]
        cut += len(kept) < len(response)
        features.append({"input_ids": prompt + kept, "labels": [IGNORE] * len(prompt) + kept, "prompt_len": len(prompt)})
    if cut:
        log.warning("%d of %d responses were cut to fit model.max_length=%d", cut, len(examples), max_length)
    return features


def pack(features: list[dict[str, Any]], max_length: int, seed: int) -> list[dict[str, Any]]:
    """Whole examples, in an order shuffled with ``seed``, filled greedily into rows of at most
    ``max_length`` tokens; ``position_ids`` restart at 0 with each example."""
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    rows: list[dict[str, Any]] = []
    for i in order:
        ids, labels = features[i]["input_ids"], features[i]["labels"]
        if not rows or len(rows[-1]["input_ids"]) + len(ids) > max_length:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[-1]
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += list(range(len(ids)))
    return rows


class CausalLMCollator:
    """Pads a batch to its longest row: ``input_ids`` with the pad id, ``labels`` with -100.

    Unpacked rows get an ``attention_mask`` (right padding). Packed rows carry ``position_ids``
    and no mask, so transformers builds one example-by-example from them; their padding is given
    positions of its own (0, 1, ...), a separate sequence that no real token attends to. With
    ``with_prompts`` (evaluation) the batch also holds the prompts alone, left-padded for
    generation (``prompt_ids``, ``prompt_mask``), and each example's ``index``.
    """

    def __init__(self, pad_id: int, with_prompts: bool = False):
        self.pad_id, self.with_prompts = pad_id, with_prompts

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": self._pad([r["input_ids"] for r in rows], width, self.pad_id),
            "labels": self._pad([r["labels"] for r in rows], width, IGNORE),
        }
        if "position_ids" in rows[0]:
            batch["position_ids"] = torch.tensor(
                [r["position_ids"] + list(range(width - len(r["position_ids"]))) for r in rows])
        else:
            batch["attention_mask"] = self._pad([[1] * len(r["input_ids"]) for r in rows], width, 0)
        if self.with_prompts:
            prompts = [r["input_ids"][: r["prompt_len"]] for r in rows]
            longest = max(map(len, prompts))
            batch["prompt_ids"] = torch.tensor([[self.pad_id] * (longest - len(p)) + p for p in prompts])
            batch["prompt_mask"] = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
            batch["index"] = torch.tensor([r["index"] for r in rows])
        return batch

    @staticmethod
    def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad token's id, or EOS's for tokenizers without one (padding is masked either way)."""
    found = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if found is None:
        raise ConfigError("the model's tokenizer has neither a pad nor an EOS token; allowed: a causal LM whose "
                          "tokenizer defines one of them")
    return found


def make_train_loader(examples: list[Example], fmt: PromptFormat, max_length: int, batch_size: int, seed: int,
                      packing: bool = False, shard: Context | None = None, group_by_length: bool = False) -> DataLoader:
    """Shuffled batches of ``batch_size`` rows (the global batch; with ``shard``, this process's
    slice); rows are examples, or packs of them with ``packing``; ``group_by_length`` batches
    rows of similar length together."""
    features = encode(examples, fmt, max_length)
    if packing:
        features = pack(features, max_length, seed)
        log.info("packing: %d examples in %d rows of up to %d tokens", len(examples), len(features), max_length)
    return batch_loader(features, batch_size, CausalLMCollator(pad_id(fmt.tokenizer)), True, seed, shard, group_by_length)


def make_eval_loader(examples: list[Example], fmt: PromptFormat, max_length: int, batch_size: int) -> DataLoader:
    """Batches sorted by prompt length (generation pads little), each with its examples'
    ``index``; ``loader.references`` holds the reference responses in the eval set's order."""
    features = [{**f, "index": i} for i, f in enumerate(encode(examples, fmt, max_length))]
    features.sort(key=lambda f: f["prompt_len"])
    loader = batch_loader(features, batch_size, CausalLMCollator(pad_id(fmt.tokenizer), True), False)
    loader.references = [ex["response"] for ex in examples]
    return loader
