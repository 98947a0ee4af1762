"""Forgetting: how far training has moved the model from what it did before, on inputs the loss
never saw. Measured at every evaluation (logged as ``forget/<metric>``) and recorded in
summary.json (``forgetting``), so that ``analysis/compare.py`` reports it beside the task metric
and ``analysis/forgetting.py`` plots one against the other (Biderman et al. 2024, Fig. 1).

A probe takes its reference from the model as training starts, after the variant's
initialisation and before the first step. For every variant here that is the pretrained model's
function (PiSSA and LoRA-GA move W0 but start at W0 + ΔW = W0; LoRA, DoRA, AdaLoRA and EVA
start with a zero factor, ΔW = 0); for QLoRA it is its quantized base; with ``init_from``, the
adapters it started from. The reference goes into every checkpoint, so a resumed run compares
against the same one. The probe draws no random numbers (the trainer forks the generators
around it), so turning it on or off leaves training exactly as it was; it costs a forward pass
over its inputs at each evaluation (encoders), or greedy generation on its prompts (causal LMs),
counted in the run's time.

* Encoders (classification tasks), ``RepresentationDrift``: 1 − linear CKA (Kornblith et al.
  2019, "Similarity of Neural Network Representations Revisited", Eq. 5 with a linear kernel)
  between the backbone's last hidden states, mean-pooled over each input's tokens (how the
  sentence encoders here embed a sentence), before and now, on ``examples`` inputs: the task's
  main evaluation set (held out of training: the drift of the representation on the task's own
  kind of input, not of what was fitted) or ``trainer.forgetting.file`` (one text per line: any
  text outside the task). 0: the same representation up to a rotation and a uniform scale; the
  more the geometry of the inputs changed, the nearer 1. The classifier head is not involved.
* Causal LMs, ``ContinuationShift``: the change in loss (mean NLL per response token, given the
  prompt) and in exact match on prompts outside the task: ``trainer.forgetting.file`` (JSONL
  with the task's prompt and response fields: a held-out skill with its references), or by
  default ``GENERIC_PROMPTS`` below, which the starting model answers itself (greedy,
  ``max_new_tokens``). Its own answers are what it did before, so ``loss_change`` is how much
  less likely it now finds them (nats per token, > 0: forgotten) and ``exact_match`` (1 at the
  start) the share it still gives word for word (to the same length). They are scored as
  written, without the end of the turn: many are cut at ``max_new_tokens``, and whether the
  model now ends its turn sooner (as fine-tuning on short answers teaches) is not what is
  measured.

Each probe names its headline metric (``headline``): what compare.py's column and the plot use.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from schema import ConfigError

from .data import make_loader, sft
from .device import Runtime
from .evaluation import GenerationEvaluator

# Generic requests a small instruction-tuned model answers in its own words: explanation, advice,
# definition, description, short writing. None is a task this framework trains on.
GENERIC_PROMPTS = (
    "Explain why the sky looks blue during the day.",
    "What is photosynthesis? Answer in two sentences.",
    "Give three tips for sleeping better.",
    "Describe a cat to someone who has never seen one.",
    "Why do we have seasons on Earth?",
    "Write a short poem about the sea.",
    "What is the difference between weather and climate?",
    "How do I boil an egg?",
    "What does a librarian do?",
    "Summarize the story of Cinderella in three sentences.",
    "Why is exercise good for your health?",
    "What is a volcano?",
    "Suggest a name for a small bakery and explain it.",
    "How does a bicycle stay upright when it moves?",
    "What are the primary colors?",
    "Write a polite email declining a meeting invitation.",
    "What is the capital of France, and what is it known for?",
    "Explain what a computer program is to a child.",
    "List four animals that live in the ocean.",
    "Why do leaves change color in autumn?",
    "What should I pack for a weekend camping trip?",
    "Describe the taste of a lemon.",
    "What is gravity?",
    "Give me a simple recipe for a green salad.",
    "Why is it important to drink water?",
    "What is the role of the heart in the human body?",
    "Tell me a fun fact about elephants.",
    "How can I improve my handwriting?",
    "What is an island?",
    "Explain the rules of tic-tac-toe.",
    "What causes rain?",
    "Write two sentences welcoming a new colleague to the team.",
    "What is the moon made of?",
    "How do plants drink water?",
    "What makes a good friend?",
    "Describe a busy city street in the morning.",
    "Why do people celebrate birthdays?",
    "What is the difference between a fruit and a vegetable?",
    "How do you make a paper airplane?",
    "What is a rainbow?",
)


class Probe(Protocol):
    headline: str     # the metric the comparison and the plot report
    description: str  # what is measured, on what: summary.json records it

    def reference(self, model: nn.Module, runtime: Runtime) -> dict[str, Any]:
        """What the model as training starts gives (tensors, strings, numbers: a checkpoint holds it)."""

    def measure(self, model: nn.Module, runtime: Runtime, reference: dict[str, Any]) -> dict[str, float]:
        """The model now against ``reference``."""


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same ``n`` inputs, ``x`` (n, d1) and ``y`` (n, d2):
    ||yᵀx||²_F / (||xᵀx||_F ||yᵀy||_F) after centring each feature over the inputs (Kornblith et
    al. 2019, Eq. 5 with k(a, b) = aᵀb). 1 when ``y`` is ``x`` rotated, scaled or shifted; NaN
    (undefined) when either does not vary over the inputs."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    scale = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / scale) if scale > 0 else math.nan


class RepresentationDrift:
    headline = "drift"

    def __init__(self, loader: Any, source: str):
        self.loader = loader  # batches of tokenized inputs; their labels, if any, unused
        self.description = f"1 - linear CKA of the mean-pooled last hidden states, start vs now, on {source}"

    @torch.no_grad()
    def features(self, model: nn.Module, runtime: Runtime) -> torch.Tensor:
        """(n, hidden) mean-pooled last hidden states, in the loader's order; train/eval mode kept."""
        was_training = model.training
        model.eval()
        pooled = []
        for batch in self.loader:
            batch = runtime.to_device({k: v for k, v in batch.items() if k != "labels"})
            with runtime.autocast():
                hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()  # (B, T, hidden)
            mask = batch["attention_mask"].unsqueeze(-1).float()                                 # (B, T, 1)
            pooled.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())                          # (B, hidden)
        model.train(was_training)
        return torch.cat(pooled)

    def reference(self, model: nn.Module, runtime: Runtime) -> dict[str, Any]:
        return {"features": self.features(model, runtime)}

    def measure(self, model: nn.Module, runtime: Runtime, reference: dict[str, Any]) -> dict[str, float]:
        now = self.features(model, runtime)
        if now.shape[0] != reference["features"].shape[0]:
            raise ConfigError(f"trainer.forgetting: {now.shape[0]} probe inputs now, {reference['features'].shape[0]} "
                              "when the run started; resume with the probe settings the run started with")
        cka = linear_cka(reference["features"], now)
        return {"drift": 1.0 - cka, "cka": cka}


class ContinuationShift:
    headline = "loss_change"

    def __init__(self, examples: list[dict[str, Any]], fmt: sft.PromptFormat, max_length: int, batch_size: int,
                 max_new_tokens: int, source: str):
        """``examples``: {prompt, response}, the response None where the starting model answers."""
        self.examples, self.max_length, self.batch_size = examples, max_length, batch_size
        self.fmt = fmt if all(ex["response"] is not None for ex in examples) else replace(fmt, open_response=True)
        self.evaluate = GenerationEvaluator(["exact_match"], fmt.tokenizer, max_new_tokens)
        self.description = f"change in NLL per response token and in exact match, start vs now, on {source}"
        self._loader = None  # built once the references are known

    def reference(self, model: nn.Module, runtime: Runtime) -> dict[str, Any]:
        examples = [dict(ex) for ex in self.examples]
        unanswered = [i for i, ex in enumerate(examples) if ex["response"] is None]
        if unanswered:  # the starting model's own greedy answers, as written
            asked = [{"prompt": examples[i]["prompt"], "response": ""} for i in unanswered]
            _, generations = self.evaluate(model, self._make_loader(asked), runtime)
            for i, answer in zip(unanswered, generations.generated):
                examples[i]["response"] = str(answer)
        examples = [{"prompt": ex["prompt"], "response": ex["response"]} for ex in examples]
        self._loader = self._make_loader(examples)
        start, _ = self.evaluate(model, self._loader, runtime)
        return {"examples": examples, "start": start}

    def measure(self, model: nn.Module, runtime: Runtime, reference: dict[str, Any]) -> dict[str, float]:
        if self._loader is None:  # resumed: the references come from the checkpoint
            self._loader = self._make_loader(reference["examples"])
        now, _ = self.evaluate(model, self._loader, runtime)
        start = reference["start"]
        return {"loss_change": now["loss"] - start["loss"], "loss": now["loss"],
                "exact_match_change": now["exact_match"] - start["exact_match"], "exact_match": now["exact_match"]}

    def _make_loader(self, examples: list[dict[str, Any]]) -> Any:
        named = [{**ex, "where": f"trainer.forgetting prompt {i + 1}"} for i, ex in enumerate(examples)]
        return sft.make_eval_loader(named, self.fmt, self.max_length, self.batch_size)


def build_probe(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, eval_sets: dict[str, list]) -> Probe | None:
    """The run's probe (``trainer.forgetting``), or None when it is off."""
    settings = cfg.trainer.forgetting
    if not settings.measure:
        return None
    count, path = settings.examples, settings.file
    if cfg.task.type == "causal_lm":
        examples = (sft.read_jsonl(path, cfg.task, "trainer.forgetting.file") if path
                    else [{"prompt": p, "response": None} for p in GENERIC_PROMPTS])[:count]
        source = f"{len(examples)} prompts of {path}" if path else f"{len(examples)} generic prompts (GENERIC_PROMPTS)"
        return ContinuationShift(examples, sft.prompt_format(tokenizer, cfg.task), cfg.model.max_length,
                                 cfg.trainer.eval_batch_size, settings.max_new_tokens, source)
    if path:
        texts = _text_file(path)[:count]
        inputs, fields, source = [{"text": t, "label": 0} for t in texts], ["text"], f"{len(texts)} lines of {path}"
    else:
        inputs, fields = eval_sets["main"][:count], list(cfg.task.text_fields)
        source = f"the first {len(inputs)} inputs of the task's main evaluation set"
    loader = make_loader(inputs, tokenizer, fields, cfg.model.max_length, cfg.trainer.eval_batch_size, shuffle=False)
    return RepresentationDrift(loader, source)  # its length-sorted order is the same at every pass


def summarize(probe: Probe | None, history: list[tuple[int, dict[str, float]]], steps: dict[str, int | None]
              ) -> dict[str, Any] | None:
    """summary.json's ``forgetting``: what was measured, the headline metric, and the metrics at
    the last evaluation (``final``) and at each named step (``at_best``, ``at_best_val``);
    None when nothing was measured."""
    if probe is None or not history:
        return None
    by_step = dict(history)
    return {"measure": probe.description, "headline": probe.headline, "final": history[-1][1],
            **{f"at_{name}": by_step.get(step) for name, step in steps.items()}}


def _text_file(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"trainer.forgetting.file={path!r} is not a file; allowed: a text file, one input per line")
    texts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if len(texts) < 2:
        raise ConfigError(f"trainer.forgetting.file={path!r} has {len(texts)} non-empty lines; CKA needs at least 2")
    return texts
