"""The trainer reaches variants only through the hooks: train begin, extra loss, after-optimizer-step."""

from collections.abc import Mapping

import torch
from torch import nn
from omegaconf import OmegaConf

import variants
from training.data import make_loader
from training.smoke_task import generate
from training.tracking import Tracker
from training.trainer import train
from variants import AdapterLayer, LoRALinear, register_variant


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
    tracker = Tracker(tmp_path, {}, mode="disabled")
    result = train(model, loader, eval_loader, TRAINER, ["accuracy"], tracker, torch.device("cpu"))
    tracker.finish()

    assert HookedLoRA.began == [(12, 6)]
    assert HookedLoRA.calls == [(12, step, 6, True) for step in range(1, 7)]
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "hook/last_step" in line]
    assert len(logged) == 2 and '"hook/last_step": 6.0' in logged[-1]
    assert all('"train/adapter_loss"' in line for line in logged)
    # The penalty is part of the optimised loss: A shrinks though the task loss alone would not shrink it.
    norm_after = sum(layer.lora_A.pow(2).sum().item() for _, layer in variants.adapter_layers(model))
    assert norm_after < 0.9 * norm_before
    assert result.steps == 6 and set(result.eval_metrics) == {"loss", "accuracy"}
