"""The config groups other than the variant: ``trainer``, ``task``, ``model`` and ``tracking``.

Each field is the one place its key's type, default, meaning and allowed values are written;
``conf/<group>/*.yaml`` hold only what differs from these defaults, and docs/configuration.md is
generated from them (``python -m schema.docs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .fields import knob

OPTIMIZERS = ("auto", "adamw", "paged_adamw_32bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")  # training/optim.py MULTIPLIERS: transformers' schedules at get_scheduler's defaults
WEIGHT_DECAY_ON = ("matrices", "all")
SELECT_ON = ("auto", "val", "main")
EVAL_OTHERS = ("always", "when_best")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
MODEL_TYPES = ("classification", "causal_lm")
MODEL_DTYPES = ("float32", "bfloat16", "float16", "auto")
WANDB_MODES = ("online", "offline", "disabled")
CLASSIFICATION_SOURCES = ("smoke", "glue")
SFT_SOURCES = ("sft_smoke", "jsonl", "hub")
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
LM_METRICS = ("loss", "perplexity", "exact_match", "answer_in_output")
_EVAL_EVERY = re.compile(r"epoch(/[1-9][0-9]*)?")


def _eval_every(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 1) or (isinstance(value, str) and bool(_EVAL_EVERY.fullmatch(value)))


@dataclass
class Divergence:
    factor: float | None = knob(10.0, "stop the run as failed when the logged training loss stays above factor × its "
                                "minimum (and above its first value) for `logs` logs in a row; null turns it off; a "
                                "NaN or infinite loss stops it at once", within="> 1")
    logs: int = knob(3, "how many logs in a row the loss must stay that high", within=">= 1")


@dataclass
class EarlyStopping:
    patience: int | None = knob(None, "stop after this many evaluations in a row without a gain above min_delta on "
                                "trainer.select_on; null: train to the end of the schedule", within=">= 1")
    min_delta: float = knob(0.0, "a gain no larger than this (in the metric's units) does not reset the patience",
                            within=">= 0")
    min_epochs: float = knob(0.0, "never stop early before this many epochs (as Lightning's min_epochs)",
                             within=">= 0")


@dataclass
class Forgetting:
    measure: bool = knob(True, "measure at every evaluation how far the model moved from where it started, on "
                         "inputs it does not train on (training/forgetting.py): encoders, 1 - CKA of their "
                         "representations; causal LMs, the change in loss on prompts outside the task")
    examples: int = knob(256, "inputs (encoders) or prompts (causal LMs) measured, at most", within=">= 2")
    file: str | None = knob(None, "null: the task's main eval inputs (encoders), built-in generic prompts answered by "
                            "the starting model (causal LMs) | a text file, one input per line (encoders) | a JSONL "
                            "file with the task's prompt and response fields (causal LMs)")
    max_new_tokens: int = knob(32, "causal LMs: greedy generation's length for the starting model's answers and "
                               "exact match", within=">= 1")


@dataclass
class Trainer:
    max_steps: int | None = knob(300, "optimizer steps, used when epochs is null", within=">= 1")
    epochs: float | None = knob(None, "when set, the run lasts this many passes over the training set", within="> 0")
    batch_size: int = knob(32, "examples per optimizer step (across all ranks under torchrun)", within=">= 1")
    eval_batch_size: int = knob(128, "examples per evaluation batch", within=">= 1")
    lr: float | None = knob(None, "peak learning rate; null: the variant's own (variant.lr)", within="> 0")
    weight_decay: float = knob(0.0, "AdamW's decoupled weight decay", within=">= 0")
    weight_decay_on: str = knob("matrices", "matrices: tensors of 2 or more dimensions (weights, embeddings, "
                                "adapter factors; not biases, norms, DoRA's m, AdaLoRA's λ) | all",
                                choices=WEIGHT_DECAY_ON)
    scheduler: str = knob("linear", "the learning-rate schedule (transformers' get_scheduler names)",
                          choices=SCHEDULERS)
    warmup_ratio: float = knob(0.06, "the share of the steps that warm the rate up from 0", within="[0, 1)")
    divergence: Divergence = knob(Divergence(), "the divergence guard")
    grad_clip: float | None = knob(1.0, "max gradient norm; 0 or null turns clipping off", within=">= 0")
    log_every: int = knob(10, "steps between training-loss logs", within=">= 1")
    eval_every: Any = knob(100, "steps between evaluations, or epoch, or epoch/N (N evaluations an epoch)",
                           rule=_eval_every, allowed="a positive integer, epoch or epoch/N")
    eval_at_start: bool = knob(False, "evaluate once before the first step too (step 0: where the model starts)")
    select_on: str = knob("auto", "the eval set whose task.main_metric picks the best evaluation and drives early "
                          "stopping: auto (val when task.val_fraction holds one out, else main) | val | main",
                          choices=SELECT_ON)
    early_stopping: EarlyStopping = knob(EarlyStopping(), "early stopping on trainer.select_on")
    eval_others: str = knob("always", "always: every eval set at each evaluation | when_best: the sets other than "
                            "select_on only at a new best and at the last evaluation", choices=EVAL_OTHERS)
    forgetting: Forgetting = knob(Forgetting(), "the forgetting probe (forget/* metrics, summary.json forgetting)")
    keep_best: bool = knob(False, "write adapter_best.safetensors at each new best select_on evaluation")
    group_by_length: bool = knob(False, "batches of examples of similar length, their order shuffled (as Hugging "
                                 "Face's group_by_length): less padding")
    device: str = knob("auto", "auto (cuda when present) | cpu | cuda | cuda:N")
    strategy: str = knob("ddp", "how the processes of a torchrun job share the model: ddp (each holds all of it; "
                         "gradients averaged) | fsdp (each holds 1/N of every parameter, gradient and optimizer "
                         "state: PyTorch's fully_shard); one process trains unsharded either way",
                         choices=STRATEGIES)
    precision: str = knob("auto", "auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 (autocast; the "
                          "trained tensors stay fp32)", choices=PRECISIONS)
    optimizer: str = knob("auto", "auto (the variant's paper's: QLoRA's paged_adamw_32bit on CUDA, else adamw) | "
                          "adamw | paged_adamw_32bit | paged_adamw_8bit (bitsandbytes, CUDA only)",
                          choices=OPTIMIZERS)
    gradient_checkpointing: bool = knob(False, "recompute activations in backward: less memory, ~30% slower")
    checkpoint_every: int | None = knob(100, "steps between checkpoints (checkpoint.pt, removed when the run "
                                        "completes); null: none", within=">= 1")

    def rules(self, prefix: str) -> list[str]:
        found = []
        if self.max_steps is None and self.epochs is None:
            found.append(f"{prefix}.max_steps=None and {prefix}.epochs=None: the run needs a length; allowed: "
                         f"{prefix}.max_steps an integer >= 1, or {prefix}.epochs a number > 0")
        if self.strategy == "fsdp" and self.optimizer not in ("auto", "adamw"):
            found.append(f"{prefix}.optimizer={self.optimizer} cannot step parameters sharded by {prefix}.strategy=fsdp "
                         "(bitsandbytes sizes its state from the whole tensor); allowed there: auto, adamw")
        return found


@dataclass
class Model:
    name_or_path: str = knob("minilm", "a hub name, a local folder, or a packaged alias (minilm, smollm2)")
    type: str = knob("classification", "classification | causal_lm: must match the task's type", choices=MODEL_TYPES)
    attention_qv: list[str] = knob(["query", "value"], "the names of W_q and W_v, the LoRA paper's default targets")
    train_modules: list[str] = knob(["classifier"], "modules that train in full beside the variant (a new task head)")
    head_modules: list[str] = knob("${model.train_modules}", "what variant=head trains: the task head (a causal "
                                   "LM's output layer, which is not among train_modules)")
    gguf_file: str | None = knob(None, "a GGUF file inside name_or_path (the smollm2 alias sets its own)")
    dtype: str = knob("float32", "the weights' dtype; bfloat16 trains under bf16 autocast, auto keeps the stored "
                      "one; what trains is kept in fp32", choices=MODEL_DTYPES)
    max_length: int = knob(128, "tokens per example (prompt + response for a causal LM)", within=">= 1")
    dropout: float | None = knob(None, "set every dropout of the base model to this p; null keeps the checkpoint's",
                                 within="[0, 1)")
    keep_layers: int | None = knob(None, "keep only the first N blocks (quick checks of the machinery, not results)",
                                   within=">= 1")


@dataclass
class Tracking:
    mode: str = knob("offline", "W&B: offline (<run dir>/wandb; `wandb sync` later) | online | disabled; "
                     "metrics.jsonl is written in every mode", choices=WANDB_MODES)
    project: str = knob("lora-variants", "the W&B project")
    entity: str | None = knob(None, "the W&B entity (user or team)")
    group: str | None = knob(None, "the W&B group; default: the sweep's name, shared by all jobs of a multirun")
    tags: list[str] = knob([], "W&B tags")


@dataclass
class Tsv:
    train: str = knob("train.tsv", "the training file of the task's GLUE folder")
    eval: dict = knob({"main": "dev.tsv"}, "eval set name -> file")
    columns: list[str] | None = knob(None, "the column names of headerless files; null: the first line is a header")
    text_columns: list[str] = knob([], "the columns holding the text (two: a sentence pair)")
    label_column: str = knob("label", "the column holding the label")
    skip_malformed: bool = knob(False, "skip rows of the wrong width instead of stopping at the first")


@dataclass
class ClassificationTask:
    """A sentence or sentence-pair classification (or regression) task: GLUE, or the offline smoke task."""

    name: str = knob("smoke", "the task's name (run dirs, summaries, tables)")
    type: str = knob("classification", "must match model.type", choices=("classification",))
    source: str = knob("smoke", "smoke (generated offline) | glue (task.data_dir, else the hub)",
                       choices=CLASSIFICATION_SOURCES)
    num_labels: int = knob(2, "classes (1: regression, STS-B)", within=">= 1")
    metrics: list[str] = knob(["accuracy"], "what each evaluation reports; allowed: "
                              + ", ".join(CLASSIFICATION_METRICS))
    main_metric: str = knob("accuracy", "the metric tables report and selection compares; one of task.metrics")
    text_fields: list[str] = knob(["sentence"], "the hub's text columns; two are tokenized as a pair")
    label_field: str = knob("label", "the hub's label column")
    label_names: list[str] | None = knob(None, "class names the TSV files spell labels with, in class-id order")
    hf_path: str | None = knob(None, "the hub dataset (source=glue without data_dir)")
    hf_name: str | None = knob(None, "the hub dataset's config")
    eval_splits: dict = knob({"main": "validation"}, "eval set name -> hub split")
    data_dir: str | None = knob(None, "a GLUE task folder of TSV files; null: load from the hub")
    glue_folder: str | None = knob(None, "this task's folder in the GLUE distribution (glue_data/<folder>)")
    tsv: Tsv = knob(Tsv(), "the GLUE distribution's files and columns")
    train_size: int = knob(4000, "source=smoke: generated training examples", within=">= 1")
    eval_size: int = knob(1000, "source=smoke: generated eval examples", within=">= 1")
    max_train_examples: int | None = knob(None, "use only the first N training examples", within=">= 1")
    max_eval_examples: int | None = knob(None, "use only the first N examples of each eval set", within=">= 1")
    val_fraction: float | None = knob(None, "hold out this share of the training set (stratified, drawn with seed) "
                                      "as `val` for selection; the eval set is then reported as a test set",
                                      within="(0, 0.5]")
    paper: dict | None = knob(None, "the LoRA paper's RoBERTa-base setting (Table 9): batch_size, epochs, lr")

    def rules(self, prefix: str) -> list[str]:
        unknown = [m for m in self.metrics if m not in CLASSIFICATION_METRICS]
        if unknown:
            return [(f"{prefix}.metrics has {unknown}; allowed for a classification task: "
                     f"{', '.join(CLASSIFICATION_METRICS)}")]
        return _main_metric_rule(self, prefix)


def _chat_template(value: Any) -> bool:
    return value == "auto" or value is True or value is False  # `is`: 0 and 1 are not false and true


@dataclass
class InstructionTask:
    """Instruction tuning of a causal LM: prompt/response pairs from JSONL files, the hub, or the
    offline sft_smoke generator."""

    name: str = knob("sft", "the task's name (run dirs, summaries, tables)")
    type: str = knob("causal_lm", "must match model.type", choices=("causal_lm",))
    source: str = knob("jsonl", "jsonl (train_file, eval_files) | hub (hf_path, splits) | sft_smoke (generated "
                       "offline)", choices=SFT_SOURCES)
    train_file: str | None = knob(None, "source=jsonl: one {prompt, response} object per line")
    eval_files: dict = knob({"main": None}, "source=jsonl: eval set name -> JSONL file; main is the reported set")
    hf_path: str | None = knob(None, "source=hub: the dataset")
    hf_name: str | None = knob(None, "source=hub: the dataset's config")
    splits: dict = knob({"train": "train", "main": "validation"}, "source=hub: which split is which")
    prompt_field: str = knob("prompt", "the prompt's field")
    response_field: str = knob("response", "the response's field")
    chat_template: Any = knob("auto", "auto (the tokenizer's, if it has one) | true (required) | false (the prompt "
                              "as written)", rule=_chat_template, allowed="one of auto, true, false")
    system_prompt: str | None = knob(None, "a system turn before each prompt; null: the template's own default")
    packing: bool = knob(False, "pack whole examples into rows of up to model.max_length tokens")
    max_new_tokens: int = knob(32, "greedy generation's length limit at evaluation", within=">= 1")
    train_size: int = knob(2000, "source=sft_smoke: generated training examples", within=">= 1")
    eval_size: int = knob(200, "source=sft_smoke: generated eval examples", within=">= 1")
    metrics: list[str] = knob(["exact_match", "answer_in_output", "perplexity"],
                              "what each evaluation reports (loss always); allowed: " + ", ".join(LM_METRICS))
    main_metric: str = knob("exact_match", "the metric to report and select on (perplexity: lower is better)")
    max_train_examples: int | None = knob(None, "use only the first N training examples", within=">= 1")
    max_eval_examples: int | None = knob(None, "use only the first N examples of each eval set", within=">= 1")
    val_fraction: float | None = knob(None, "hold out this share of the training set (drawn with seed) as `val`",
                                      within="(0, 0.5]")

    def rules(self, prefix: str) -> list[str]:
        unknown = [m for m in self.metrics if m not in LM_METRICS]
        if unknown:
            return [f"{prefix}.metrics has {unknown}; allowed for a causal_lm task: {', '.join(LM_METRICS)}"]
        return _main_metric_rule(self, prefix) + self._source_rules(prefix)

    def _source_rules(self, prefix: str) -> list[str]:
        """What the chosen source needs (sft_smoke's size limit is checked where it is known:
        ``training.data.synthetic.generate_sft_smoke``)."""
        if self.source == "jsonl" and self.eval_files.get("main") is None:
            return [(f"{prefix}.eval_files={dict(self.eval_files)!r} must map set names to JSONL files, "
                    f"with main, e.g. {prefix}.eval_files.main=dev.jsonl")]
        if self.source == "hub" and not (self.hf_path and self.splits.get("train") and self.splits.get("main")):
            return [(f"{prefix}.source=hub needs {prefix}.hf_path (got {self.hf_path!r}) and {prefix}.splits with "
                    f"train and main (got {dict(self.splits)!r})")]
        return []


def _main_metric_rule(task: Any, prefix: str) -> list[str]:
    if task.main_metric not in task.metrics:
        return [f"{prefix}.main_metric={task.main_metric!r} must be one of task.metrics: {list(task.metrics)}"]
    return []
