"""Every variant learns the offline smoke task through the real trainer (a short, larger-lr run)."""

import pytest
import torch
from helpers.loop import train_in_process
from omegaconf import OmegaConf

import variants
from training.data import make_loader
from training.data.synthetic import generate_smoke as generate
from training.device import Runtime
from training.evaluation import evaluate


def trainer_cfg(lr: float):
    return OmegaConf.create({
        "max_steps": 150, "epochs": None, "lr": lr, "weight_decay": 0.0, "scheduler": "linear",
        "warmup_ratio": 0.06, "grad_clip": 1.0, "log_every": 50, "eval_every": 150,
    })


# AdaLoRA's single λ per rank needs a larger rate to move as fast in a short run (README, AdaLoRA).
# The variants with a data-driven start or their own step (LoRA-GA, LoRA-Pro, LoRA+, PiSSA, MiLoRA,
# EVA, rsLoRA) learn the same task through run.py instead: tests/test_run.py.
@pytest.mark.parametrize("variant, rank, kwargs, lr", [
    ("lora", 8, {}, 3e-3),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("dora", 8, {}, 3e-3), ("adalora", 12, {"target_rank": 8}, 3e-2), ("qlora", 8, {}, 3e-3),
        ("staged", 8, {"full_fraction": 0.2, "full_lr": 5e-5}, 3e-3)]),
])
def test_variant_learns_smoke_task(minilm, tmp_path, variant, rank, kwargs, lr):
    torch.manual_seed(0)
    model, tokenizer = minilm
    variants.inject_adapters(model, variant, ["query", "value"], rank=rank, alpha=16, exclude=["classifier"], **kwargs)
    variants.mark_trainable(model, train_modules=["classifier"])
    train_set, eval_set = generate(1280, 300)
    loader = make_loader(train_set, tokenizer, ["sentence"], 64, 16, shuffle=True, seed=0)
    eval_loader = make_loader(eval_set, tokenizer, ["sentence"], 64, 100, shuffle=False)
    before = evaluate(model, eval_loader, ["accuracy"], Runtime(torch.device("cpu")))
    result = train_in_process(model, loader, eval_loader, trainer_cfg(lr), tmp_path)
    assert before["accuracy"] < 0.65
    assert result.eval_metrics["accuracy"] > 0.85, result.eval_metrics
