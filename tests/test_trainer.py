"""The trainer reaches variants only through the hooks: train begin, extra loss, after-optimizer-step."""

import copy
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn
from omegaconf import OmegaConf

import variants
from training.data import make_loader
from training.smoke_task import generate
from training import optim
from training.device import peak_memory_mb, reset_peak_memory
from training.trainer import check_trainer_config, plan_run
from helpers.loop import train_in_process
from variants import AdapterLayer, ConfigError, LoRALinear, register_variant


@register_variant("test-hooked-lora")
class HookedLoRA(LoRALinear):
    """LoRA plus a penalty on ‖A‖² and a record of every hook call."""

    calls: list[tuple[int, int, int, bool]] = []
    began: list[tuple[int, int]] = []
    penalty = 10.0

    def extra_loss(self) -> torch.Tensor:
        return self.penalty * self.lora_A.pow(2).sum()

    @classmethod
    def on_train_begin(cls, model: nn.Module, layers: Mapping[str, AdapterLayer], total_steps: int) -> None:
        cls.began.append((len(layers), total_steps))

    @classmethod
    def after_optimizer_step(
        cls, model: nn.Module, layers: Mapping[str, AdapterLayer], step: int, total_steps: int
    ) -> dict[str, float]:
        assert all(name.startswith("bert.encoder.layer.") for name in layers)
        has_grad = all(layer.lora_A.grad is not None for layer in layers.values())
        cls.calls.append((len(layers), step, total_steps, has_grad))
        return {"hook/last_step": float(step)}


TRAINER = OmegaConf.create({
    "max_steps": 6, "epochs": None, "lr": 1e-2, "weight_decay": 0.0, "scheduler": "constant",
    "warmup_ratio": 0.0, "grad_clip": None, "log_every": 3, "eval_every": 6,
})


def test_hooks_are_called_with_all_layers_and_live_gradients(minilm, tmp_path):
    model, tokenizer = minilm
    variants.inject_adapters(model, "test-hooked-lora", ["query", "value"], rank=2, alpha=2)
    variants.mark_trainable(model, train_modules=["classifier"])
    norm_before = sum(layer.lora_A.pow(2).sum().item() for _, layer in variants.adapter_layers(model))
    train_set, eval_set = generate(32, 16)
    loader = make_loader(train_set, tokenizer, ["sentence"], 32, 8, shuffle=True)
    eval_loader = make_loader(eval_set, tokenizer, ["sentence"], 32, 16, shuffle=False)
    result = train_in_process(model, loader, eval_loader, TRAINER, tmp_path)

    assert HookedLoRA.began == [(12, 6)]
    assert HookedLoRA.calls == [(12, step, 6, True) for step in range(1, 7)]
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "hook/last_step" in line]
    assert len(logged) == 2 and '"hook/last_step": 6.0' in logged[-1]
    assert all('"train/adapter_loss"' in line for line in logged)
    # The penalty is part of the optimised loss: A shrinks though the task loss alone would not shrink it.
    norm_after = sum(layer.lora_A.pow(2).sum().item() for _, layer in variants.adapter_layers(model))
    assert norm_after < 0.9 * norm_before
    assert result.step == 6 and set(result.eval_metrics) == {"loss", "accuracy"}


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "trainer.batch_size=0 must be a positive integer"),
    ("lr", -1, "trainer.lr=-1 must be a number > 0"),
    ("weight_decay", "x", "trainer.weight_decay='x' must be a number >= 0"),
    ("warmup_ratio", 1.5, "trainer.warmup_ratio=1.5 must be a number in [0, 1)"),
    ("grad_clip", -2, "trainer.grad_clip=-2 must be null or a number >= 0"),
    ("epochs", 0, "trainer.epochs=0 must be null or a number > 0"),
    ("scheduler", "step", "trainer.scheduler='step' must be one of linear, cosine"),
    ("checkpoint_every", 0, "trainer.checkpoint_every=0 must be null or a positive integer"),
    ("weight_decay_on", "some", "trainer.weight_decay_on='some' must be one of matrices, all"),
    ("optimizer", "sgd", "trainer.optimizer='sgd' must be one of auto, adamw, paged_adamw_32bit, paged_adamw_8bit"),
])
def test_trainer_config_errors_name_the_key(key, value, message):
    cfg = OmegaConf.merge(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "trainer" / "default.yaml"),
                          {key: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trainer_config(cfg)


def test_eval_every_accepts_epoch_or_steps():
    assert plan_run(OmegaConf.create({"max_steps": 20, "eval_every": "epoch"}), 7).eval_every == 7
    assert plan_run(OmegaConf.create({"max_steps": 20, "eval_every": 5}), 7).eval_every == 5
    with pytest.raises(ConfigError, match="trainer.eval_every='sometimes' must be a positive integer or 'epoch'"):
        plan_run(OmegaConf.create({"max_steps": 20, "eval_every": "sometimes"}), 7)


def test_peak_memory_restarts_with_each_run():
    """Sweep jobs share a process: each must report its own peak, not the largest so far."""
    cpu = torch.device("cpu")
    big = torch.ones(50 * 2**20)  # 200 MB, touched
    del big
    before, _ = peak_memory_mb(cpu)
    if not reset_peak_memory(cpu):
        pytest.skip("this OS cannot reset a process's peak RSS")
    after, kind = peak_memory_mb(cpu)
    assert kind == "process_max_rss" and after < before - 150


def decay_groups(model, on="matrices"):
    cfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.1, "weight_decay_on": on, "scheduler": "linear",
                            "warmup_ratio": 0.0, "optimizer": "auto"})
    decayed, kept = optim.build(cfg, model, 10, torch.device("cpu")).optimizer.param_groups
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.1, 0.0)
    return set(decayed["param_names"]), set(kept["param_names"])


@pytest.mark.parametrize("variant, kwargs, bias", [
    ("dora", {"rank": 4, "alpha": 8}, "all"), ("adalora", {"rank": 4, "alpha": 8}, "none"), ("full", {}, "none"),
])
def test_weight_decay_applies_to_matrices_only(minilm, variant, kwargs, bias):
    """The reference trainers' rule: no decay on biases and LayerNorm weights; here also none on
    1-D adapter tensors (DoRA's magnitude, AdaLoRA's lambda), which are the weights' own scale."""
    model, _ = minilm
    targets = None if variant == "full" else ["query", "value"]
    variants.inject_adapters(model, variant, targets, exclude=["classifier"], **kwargs)
    variants.mark_trainable(model, bias=bias, train_modules=["classifier"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decayed, kept = decay_groups(model)
    assert decayed | kept == set(trainable) and not decayed & kept
    assert decayed == {n for n, p in trainable.items() if p.ndim == 2}
    assert {n for n in kept if n.endswith((".magnitude", ".lora_E"))} == {
        n for n in trainable if n.endswith((".magnitude", ".lora_E"))}
    assert all(n.endswith((".bias", "LayerNorm.weight", ".magnitude", ".lora_E")) for n in kept)
    if variant == "full":
        assert "bert.embeddings.word_embeddings.weight" in decayed and "bert.embeddings.LayerNorm.weight" in kept
    decayed_all, kept_all = decay_groups(model, on="all")
    assert decayed_all == set(trainable) and not kept_all


def test_auto_optimizer_is_the_variants_papers_on_cuda(minilm):
    """trainer.optimizer=auto: QLoRA's paged AdamW on CUDA (QLoRA §3), AdamW elsewhere and for
    the other variants. Only the device object is used: no GPU needed."""
    from training.optim import resolve_optimizer

    qlora, lora = minilm[0], copy.deepcopy(minilm[0])
    variants.inject_adapters(qlora, "qlora", "all-linear", rank=4, alpha=8, exclude=["classifier"])
    variants.inject_adapters(lora, "lora", ["query"], rank=4, alpha=8)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_optimizer("auto", qlora, cuda) == "paged_adamw_32bit"
    assert resolve_optimizer("auto", qlora, cpu) == "adamw"
    assert resolve_optimizer("auto", lora, cuda) == "adamw"
    assert resolve_optimizer("paged_adamw_8bit", lora, cuda) == "paged_adamw_8bit"
    # What the trainer builds for a QLoRA run on CUDA (the object only: stepping it needs a GPU).
    cfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "scheduler": "linear", "warmup_ratio": 0.0,
                            "optimizer": "auto"})
    variants.mark_trainable(qlora, train_modules=["classifier"])
    assert type(optim.build(cfg, qlora, 10, cuda).optimizer).__name__ == "PagedAdamW32bit"
    assert type(optim.build(cfg, qlora, 10, cpu).optimizer) is torch.optim.AdamW
