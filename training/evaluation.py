"""Evaluating a model on one eval loader: a classifier's metrics, or a causal LM's.

An evaluator is called as ``evaluator(model, loader, runtime)`` and returns (metrics, per-example
predictions); the trainer holds one and never asks which kind it is. The model's train/eval
mode is kept.

* ``ClassifierEvaluator``: mean loss and the task's metrics on the argmax (or the regression
  output), per-example logits kept.
* ``GenerationEvaluator`` (causal-LM tasks): ``loss``, the mean negative log-likelihood per
  response token over the whole set (token-weighted, as training's), and ``perplexity``,
  exp(loss); then greedy generation from each prompt, scored against the reference response:
  ``exact_match`` (equal after trimming and collapsing whitespace) and ``answer_in_output``
  (the reference appears in the generation as whole words: the content without the format).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .data.sft import IGNORE
from .device import Runtime
from .metrics import Predictions, compute_metrics


class Evaluator(Protocol):
    def __call__(self, model: nn.Module, loader: DataLoader, runtime: Runtime
                 ) -> tuple[dict[str, float], Predictions | Generations]: ...


class ClassifierEvaluator:
    def __init__(self, metric_names: Sequence[str] = ("accuracy",)):
        self.metric_names = tuple(metric_names)

    def __call__(self, model: nn.Module, loader: DataLoader, runtime: Runtime) -> tuple[dict[str, float], Predictions]:
        return evaluate_with_predictions(model, loader, self.metric_names, runtime)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, metric_names: Sequence[str], runtime: Runtime) -> dict[str, float]:
    """Mean loss and ``metric_names`` over ``loader``; the model's train/eval mode is kept."""
    return evaluate_with_predictions(model, loader, metric_names, runtime)[0]


@torch.no_grad()
def evaluate_with_predictions(model: nn.Module, loader: DataLoader, metric_names: Sequence[str], runtime: Runtime
                              ) -> tuple[dict[str, float], Predictions]:
    """``evaluate``'s metrics, and the per-example labels and scores (logits ``(n, classes)``, or
    the regression output ``(n,)``) in the loader's order."""
    was_training = model.training
    model.eval()
    scores, labels, losses = [], [], []
    for batch in loader:
        batch = runtime.to_device(batch)
        with runtime.autocast():
            out = model(**batch)
        logits = out.logits.float()
        scores.append(logits.squeeze(-1) if logits.shape[-1] == 1 else logits)
        labels.append(batch["labels"])
        losses.append(out.loss.float() * len(batch["labels"]))
    model.train(was_training)
    predictions = Predictions(labels=torch.cat(labels).cpu().numpy(), scores=torch.cat(scores).cpu().numpy())
    order = getattr(loader, "example_order", None)
    if order is not None:  # back to the eval set's own order, so runs can be paired example by example
        predictions = predictions.reordered(order)
    result = {"loss": float(torch.stack(losses).sum() / len(predictions.labels))}
    result.update(compute_metrics(list(metric_names), predictions.predicted, predictions.labels))
    return result, predictions


def normalize(text: str) -> str:
    """Trimmed, with every run of whitespace one space: what exact match compares."""
    return " ".join(text.split())


def exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


def answer_in_output(generated: str, reference: str) -> bool:
    """The reference occurs in the generation, not as part of a longer word or number."""
    answer = normalize(reference)
    return bool(answer) and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", normalize(generated)) is not None


@dataclass(frozen=True)
class Generations:
    """One causal-LM evaluation per example, in the eval set's order: the summed NLL of the
    reference response and its token count, the greedy generation, and the references."""

    nll: np.ndarray            # (n,) float: -log p(response | prompt), summed over its tokens
    tokens: np.ndarray         # (n,) int: response tokens scored
    generated: np.ndarray      # (n,) str
    references: np.ndarray     # (n,) str

    def arrays(self, eval_set: str, step: int) -> dict[str, np.ndarray]:
        """What ``predictions.npz`` keeps: the references once, the rest per step."""
        return {f"{eval_set}.references": self.references, f"{eval_set}.tokens": self.tokens,
                f"{eval_set}.nll.step{step}": self.nll.astype("float32"),
                f"{eval_set}.generated.step{step}": self.generated}


class GenerationEvaluator:
    """A causal LM's loss on the reference responses and its greedy answers to the prompts."""

    rows_per_forward = 16  # the loss pass's sub-batch: its logits are (rows, length, vocabulary)

    def __init__(self, metric_names: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int):
        self.metric_names, self.tokenizer = tuple(metric_names), tokenizer
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, model: nn.Module, loader: DataLoader, runtime: Runtime) -> tuple[dict[str, float], Generations]:
        was_training = model.training
        model.eval()
        n = len(loader.references)
        nll, tokens, generated = np.zeros(n), np.zeros(n, dtype=np.int64), np.empty(n, dtype=object)
        for batch in loader:
            batch = runtime.to_device(batch)
            index = batch["index"].cpu().numpy()
            nll[index], tokens[index] = self._response_nll(model, batch, runtime)
            generated[index] = self._generate(model, batch, runtime)
        model.train(was_training)
        result = Generations(nll, tokens, generated.astype(str), np.array(loader.references, dtype=str))
        return self._metrics(result), result

    def _response_nll(self, model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime
                      ) -> tuple[np.ndarray, np.ndarray]:
        sums, counts = [], []
        for start in range(0, len(batch["input_ids"]), self.rows_per_forward):
            rows = slice(start, start + self.rows_per_forward)
            with runtime.autocast():
                logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
            targets = batch["labels"][rows][:, 1:]  # token t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE,
                                   reduction="none")
            sums.append(loss.sum(-1))
            counts.append((targets != IGNORE).sum(-1))
        return torch.cat(sums).cpu().numpy(), torch.cat(counts).cpu().numpy()

    def _generation_config(self, model: nn.Module) -> GenerationConfig:
        """Greedy, stopping at the tokenizer's EOS or any the model's generation config names
        (a chat turn may end on its own token, e.g. Llama-3's <|eot_id|>)."""
        stops = {self.tokenizer.eos_token_id}
        own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stops.update(own if isinstance(own, list) else [own])
        stops.discard(None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(stops)
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                                eos_token_id=sorted(stops), pad_token_id=pad)

    def _generate(self, model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime) -> list[str]:
        prompts = batch["prompt_ids"]
        with runtime.autocast():
            out = model.generate(input_ids=prompts, attention_mask=batch["prompt_mask"],
                                 generation_config=self._generation_config(model))
        return self.tokenizer.batch_decode(out[:, prompts.shape[1]:], skip_special_tokens=True)

    def _metrics(self, result: Generations) -> dict[str, float]:
        loss = float(result.nll.sum() / max(int(result.tokens.sum()), 1))
        pairs = list(zip(result.generated, result.references))
        every = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "exact_match": float(np.mean([exact_match(g, r) for g, r in pairs])),
            "answer_in_output": float(np.mean([answer_in_output(g, r) for g, r in pairs])),
        }
        return {"loss": loss, **{name: every[name] for name in self.metric_names}}
