"""Knowledge texts: inputs outside the task that a variant's data-driven start reads
(``Variant.knowledge_source``; ``InitData.knowledge``): CorDA's knowledge-preserved mode estimates
the covariance of each layer's inputs on them, to keep frozen what the model does there.

A source (``variant.knowledge``) is one of:

* ``probe``: the texts the forgetting probe measures (``trainer.forgetting``, its first
  ``examples``): ``trainer.forgetting.file`` (encoders: one text per line; causal LMs: the prompts of
  its JSONL), or for a causal LM without a file the generic prompts (``GENERIC_PROMPTS``). An
  encoder's default probe is the task's own evaluation set, not knowledge outside the task: refused.
  The probe then measures forgetting on the very texts the start was fitted to (in-sample); give
  the probe and the knowledge set different texts of one source for a held-out measure.
* a GLUE task folder (``train.tsv``; the layout of the ``conf/task`` file whose ``glue_folder`` is
  the folder's name): its training inputs (pairs as pairs for an encoder, joined by a space for a
  causal LM).
* a ``.jsonl`` file (causal LMs): the prompts of its ``{prompt, response}`` objects (the task's field
  names), formatted as the model reads them. Prompts only, as the authors' knowledge sets are the
  questions of TriviaQA and NQ-open.
* any other file: one text per line, as written.

The texts are batched as the training set is (``trainer.batch_size``, shuffled with the run's seed,
each process its share of every global batch), truncated to ``model.max_length``; the variant takes
as many batches as it needs, in one pass.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from schema import ConfigError
from schema.groups import ClassificationTask

from .data import glue, make_loader, sft
from .data.examples import batch_loader
from .distributed import Context
from .forgetting import GENERIC_PROMPTS

KEY = "variant.knowledge"
TASK_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "task"
ALLOWED = "probe, a GLUE task folder, a .jsonl file (causal LMs) or a text file (one text per line)"


def knowledge_loader(source: str, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, shard: Context
                     ) -> DataLoader:
    """The batches of ``source`` for the run ``cfg`` (a ``ConfigError`` naming ``variant.knowledge``
    where it cannot be read)."""
    causal = cfg.task.type == "causal_lm"
    if source == "probe":
        texts, pairs, chat = _probe_texts(cfg, tokenizer)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            texts, pairs, chat = _glue_inputs(path, causal), None, False
            if not causal:
                texts, pairs = [t[0] for t in texts], ([t[1] for t in texts] if len(texts[0]) > 1 else None)
        elif path.is_file() and path.suffix == ".jsonl":
            if not causal:
                raise ConfigError(f"{KEY}={source!r} is instruction data (JSONL), for causal LMs; allowed for an "
                                  "encoder: probe, a GLUE task folder or a text file")
            texts, pairs, chat = _prompts(sft.read_jsonl(str(path), cfg.task, KEY), cfg, tokenizer)
        elif path.is_file():
            texts, pairs, chat = _lines(path, KEY), None, False
        else:
            raise ConfigError(f"{KEY}={source!r} is neither probe nor an existing file or folder; allowed: {ALLOWED}")
    if causal:
        return _causal_loader(texts, tokenizer, chat, cfg, shard)
    examples = [{"text": t, **({"pair": p} if pairs else {}), "label": 0} for t, p in zip(texts, pairs or texts)]
    return make_loader(examples, tokenizer, ["text", "pair"] if pairs else ["text"], cfg.model.max_length,
                       cfg.trainer.batch_size, shuffle=True, seed=cfg.seed, shard=shard)


def _probe_texts(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], None, bool]:
    """(texts, no pairs, whether they are chat-formatted): the forgetting probe's inputs."""
    settings = cfg.trainer.forgetting
    path, count = settings.file, settings.examples
    if cfg.task.type == "causal_lm":
        examples = (sft.read_jsonl(path, cfg.task, "trainer.forgetting.file") if path
                    else [{"prompt": p, "response": ""} for p in GENERIC_PROMPTS])[:count]
        return _prompts(examples, cfg, tokenizer)
    if not path:
        raise ConfigError(f"{KEY}=probe reads trainer.forgetting.file, which is not set (an encoder's default probe "
                          "is the task's own evaluation set, not knowledge outside it); allowed: "
                          f"trainer.forgetting.file=<text file>, or {KEY}=<GLUE task folder or text file>")
    return _lines(Path(path).expanduser(), "trainer.forgetting.file")[:count], None, False


def _prompts(examples: list[dict[str, Any]], cfg: DictConfig, tokenizer: PreTrainedTokenizerBase
             ) -> tuple[list[str], None, bool]:
    """The prompts as the model reads them before it answers (the task's chat template, if any)."""
    fmt = replace(sft.prompt_format(tokenizer, cfg.task), open_response=True)
    return [fmt.prompt_text(ex["prompt"]) for ex in examples], None, fmt.chat


def _lines(path: Path, key: str) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is not a file; allowed: a text file, one text per line")
    try:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}={str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not texts:
        raise ConfigError(f"{key}={str(path)!r} has no text; allowed: a text file, one text per line")
    return texts


def _glue_inputs(folder: Path, causal: bool) -> list[Any]:
    """The training inputs of the GLUE task folder ``folder``: texts (causal LMs: a pair joined by a
    space), or tuples of a pair's texts (encoders)."""
    task = _glue_task(folder)
    train, _ = glue.load(task)
    fields = list(task.text_fields)
    if causal:
        return [" ".join(ex[f] for f in fields) for ex in train]
    return [tuple(ex[f] for f in fields) for ex in train]


def _glue_task(folder: Path) -> DictConfig:
    """The task config (``conf/task``) whose GLUE folder is ``folder``'s name, reading from ``folder``."""
    known = {}
    for file in sorted(TASK_CONFIGS.glob("*.yaml")):
        spec = OmegaConf.load(file)
        if spec.get("glue_folder"):
            known[spec.glue_folder] = spec
    spec = known.get(folder.name)
    if spec is None:
        raise ConfigError(f"{KEY}={str(folder)!r} is not a GLUE task folder this project knows (its name must be "
                          f"one of {', '.join(sorted(known))}); allowed: {ALLOWED}")
    spec = OmegaConf.masked_copy(spec, [k for k in spec if k != "defaults"])
    task = OmegaConf.merge(OmegaConf.structured(ClassificationTask), spec, {"data_dir": str(folder)})
    if not (folder / task.tsv.train).is_file():
        raise ConfigError(f"{KEY}={str(folder)!r} has no {task.tsv.train}; allowed: a GLUE task folder with its "
                          "training file")
    return task


def _causal_loader(texts: list[str], tokenizer: PreTrainedTokenizerBase, chat: bool, cfg: DictConfig, shard: Context
                   ) -> DataLoader:
    """Shuffled batches of the texts' ids (chat-formatted texts carry their own special tokens),
    right-padded with an attention mask."""
    ids = tokenizer(texts, add_special_tokens=not chat, truncation=True, max_length=cfg.model.max_length)["input_ids"]
    features = [{"input_ids": row, "labels": row} for row in ids if row]
    return batch_loader(features, cfg.trainer.batch_size, sft.CausalLMCollator(sft.pad_id(tokenizer)), True,
                        cfg.seed, shard)

