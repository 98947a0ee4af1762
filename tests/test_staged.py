"""Staged full fine-tuning → LoRA: the switch, what trains in each phase, the schedule, save/load."""

import copy
import json

import pytest
import torch
from helpers.loop import train_in_process
from omegaconf import OmegaConf
from torch import nn
from transformers import get_scheduler

import variants
from schema import ConfigError
from schema.groups import SCHEDULERS
from training.data import make_loader
from training.data.synthetic import generate_smoke as generate
from variants import register_variant


@register_variant("test-recorded-staged")
class RecordedStaged(variants.Staged):
    """Staged LoRA that snapshots a base weight, the embeddings and the adapters after every step."""

    def __init__(self, rank: int, alpha: float, **settings) -> None:
        super().__init__(rank, alpha, **settings)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        first = next(iter(variants.layers_of(model).values()))
        self.snapshots.append({
            "W": first.base.weight.detach().clone(),
            "embeddings": model.bert.embeddings.word_embeddings.weight.detach().clone(),
            "A": first.lora_A.detach().clone(),
            "B": first.lora_B.detach().clone(),
            "head": model.classifier.weight.detach().clone(),
        })
        return super().after_optimizer_step(model, step, total_steps)


def trainer_cfg(**overrides):
    return OmegaConf.create({
        "max_steps": 10, "epochs": None, "lr": 1e-3, "weight_decay": 0.0, "scheduler": "linear",
        "warmup_ratio": 0.0, "grad_clip": 1.0, "log_every": 1, "eval_every": 10, **overrides,
    })


def run_staged(minilm, tmp_path, variant="test-recorded-staged", cfg=None, **kwargs):
    model, tokenizer = minilm
    variants.inject_adapters(model, variant, ["query", "value"], rank=4, alpha=8, exclude=["classifier"],
                             full_fraction=0.3, full_lr=1e-4, **kwargs)
    variants.mark_trainable(model, train_modules=["classifier"])
    train_set, eval_set = generate(160, 32)
    loader = make_loader(train_set, tokenizer, ["sentence"], 32, 16, shuffle=True, seed=0)
    eval_loader = make_loader(eval_set, tokenizer, ["sentence"], 32, 32, shuffle=False)
    result = train_in_process(model, loader, eval_loader, cfg or trainer_cfg(), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return model, result, records


def test_phases_switch_at_the_right_step_and_train_the_right_weights(minilm, tmp_path):
    initial = copy.deepcopy(minilm[0])
    model, _, records = run_staged(minilm, tmp_path)
    snaps = variants.variant_of(model).snapshots
    assert len(snaps) == 10
    w0 = initial.bert.encoder.layer[0].attention.self.query.weight
    before = [{"W": w0, "embeddings": initial.bert.embeddings.word_embeddings.weight,
               "A": snaps[0]["A"], "B": torch.zeros_like(snaps[0]["B"]), "head": initial.classifier.weight}] + snaps

    def changed(key, step):  # did `key` change in optimizer step `step` (1-based)?
        return not torch.equal(before[step - 1][key], before[step][key])

    for step in (1, 2, 3):  # full phase: base weights and head move, the adapters do not
        assert changed("W", step) and changed("embeddings", step) and changed("head", step)
        assert not changed("A", step) and not changed("B", step)
    for step in range(4, 11):  # LoRA phase on the updated weights: base frozen, adapters and head move
        assert not changed("W", step) and not changed("embeddings", step)
        assert changed("B", step) and changed("head", step)
    assert torch.equal(snaps[-1]["A"], snaps[0]["A"]) is False  # A trains once B is nonzero

    train_records = [r for r in records if "train/loss" in r]
    assert [r["phase"] for r in train_records] == [1, 1, 1] + [2] * 7
    assert all(r["phase"] == 2 for r in records if "eval/accuracy" in r)
    assert any(r.get("staged/switch_step") == 3 for r in train_records)
    # One linear decay over 10 steps, applied to full_lr before the switch and to lr after it.
    lrs = [r["train/lr"] for r in train_records]
    assert lrs[:3] == pytest.approx([1e-4 * (10 - s) / 10 for s in (1, 2, 3)])
    assert lrs[3:] == pytest.approx([1e-3 * (10 - s) / 10 for s in range(4, 11)])
    assert variants.count_parameters(model)[0] < 200_000  # LoRA phase: adapters and head only
    assert variants.adapter_report(model) == {"switch_step": 3, "full_fraction": 0.3, "full_lr": 1e-4}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_schedule_is_one_curve_across_the_switch(minilm, tmp_path, scheduler):
    """The switch at step 3 falls inside a 5-step warm-up: the new optimizer's schedule must go
    on from step 3 of the same curve, at full_lr before the switch and lr after it. Reference:
    transformers' own schedule over an optimizer of the same peak rate, stepped 10 times (the
    polynomial schedule's multiplier depends on the peak rate)."""
    cfg = trainer_cfg(scheduler=scheduler, warmup_ratio=0.5)
    _, _, records = run_staged(minilm, tmp_path, variant="staged", cfg=cfg)

    def unbroken(peak):
        dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
        reference = get_scheduler(scheduler, dummy, num_warmup_steps=5, num_training_steps=10)
        lrs = []
        for _ in range(10):
            dummy.step()
            reference.step()
            lrs.append(reference.get_last_lr()[0])
        return lrs

    expected = unbroken(1e-4)[:3] + unbroken(1e-3)[3:]
    assert [r["train/lr"] for r in records if "train/lr" in r] == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_save_load_reproduces_the_final_model(minilm, batch, tmp_path):
    base = copy.deepcopy(minilm[0])
    model, _, _ = run_staged(minilm, tmp_path, variant="staged")
    model.eval()
    path = tmp_path / "staged.safetensors"
    variants.save_adapter(model, path)
    loaded = variants.load_adapter(base, path)
    assert loaded["variant"] == "staged"
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_bad_fractions():
    staged = variants.get_variant("staged")
    with pytest.raises(ConfigError, match=r"variant.full_fraction=1.0 must be a finite number in \(0, 1\)"):
        staged.create(rank=2, alpha=2, full_fraction=1.0)
    with pytest.raises(ConfigError, match="variant.full_lr=0 must be null or a finite number > 0"):
        staged.create(rank=2, alpha=2, full_lr=0)
    with pytest.raises(ConfigError, match="gives a switch at step 0"):
        staged.create(rank=2, alpha=2, full_fraction=0.02).check_total_steps(10)
