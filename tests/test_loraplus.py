"""LoRA+ (variant.lr_ratio): B, and by default every trainable vector, at λ times the rate,
through the optimizer the trainer builds; parity with peft's ``create_loraplus_optimizer``."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

import variants
from training import optim

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer

TRAINER = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "weight_decay_on": "matrices", "scheduler": "linear",
                            "warmup_ratio": 0.0, "optimizer": "adamw"})


def rates(optimizer, names_of):
    """{parameter name: its group's lr}."""
    return {names_of[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def ours_with(model, **settings):
    variants.inject_adapters(model, "lora", ["query", "value"], rank=4, alpha=8, exclude=["classifier"], **settings)
    variants.mark_trainable(model, bias="all", train_modules=["classifier"])
    optimizer = optim.build(TRAINER, model, 10, torch.device("cpu")).optimizer
    return rates(optimizer, {id(p): n for n, p in model.named_parameters()})


def peft_name(name):
    return (name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".lora_A")
            .replace(".lora_B.default.weight", ".lora_B").replace(".base_layer.", ".base.")
            .replace("classifier.modules_to_save.default.", "classifier."))


def test_group_rates_match_peft(minilm):
    model, _ = minilm
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS"))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    expected = rates(optimizer, {id(p): peft_name(n) for n, p in theirs.named_parameters()})
    got = ours_with(model, lr_ratio=16)
    assert got == expected
    assert got["bert.encoder.layer.0.attention.self.query.lora_B"] == pytest.approx(16e-3)
    assert got["bert.encoder.layer.0.attention.self.query.lora_A"] == got["classifier.weight"] == 1e-3
    assert got["classifier.bias"] == got["bert.encoder.layer.0.output.LayerNorm.bias"] == pytest.approx(16e-3)


def test_b_only_scales_b_alone_and_no_ratio_is_one_rate(minilm):
    model, _ = minilm
    got = ours_with(copy.deepcopy(model), lr_ratio=16, lr_ratio_on="b_only")
    fast = {n for n, lr in got.items() if lr != 1e-3}
    assert fast and all(n.endswith(".lora_B") for n in fast) and all(lr == pytest.approx(16e-3) for n, lr in got.items()
                                                                      if n in fast)
    assert set(ours_with(model).values()) == {1e-3}


def test_the_ratio_survives_the_schedule(minilm):
    """The warm-up/decay multiplier scales every group alike: B stays at λ times A's rate."""
    model, _ = minilm
    variants.inject_adapters(model, "dora", ["query"], rank=2, alpha=4, lr_ratio=4)
    opt = optim.build(OmegaConf.merge(TRAINER, {"warmup_ratio": 0.3}), model, 10, torch.device("cpu"))
    for _ in range(5):
        opt.optimizer.step()
        opt.scheduler.step()
        by_scale = {group["lr_scale"]: group["lr"] for group in opt.optimizer.param_groups}
        assert by_scale[4.0] == pytest.approx(4 * by_scale[1.0]) and opt.lr == pytest.approx(by_scale[1.0])
