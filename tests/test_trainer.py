"""The trainer reaches variants only through the hooks: train begin, extra loss, after-optimizer-step."""

import copy
import re
from pathlib import Path

import pytest
import torch
from helpers.loop import train_in_process
from omegaconf import OmegaConf
from torch import nn
from transformers import get_scheduler

import variants
from schema import ConfigError
from schema.door import check_overrides
from schema.groups import SCHEDULERS
from training import optim
from training.data import make_loader
from training.data.synthetic import generate_smoke as generate
from training.device import peak_memory_mb, reset_peak_memory
from training.trainer import plan_run
from variants import register_variant


@register_variant("test-hooked-lora")
class HookedLoRA(variants.LoRA):
    """LoRA plus a penalty on ‖A‖², B's gradient erased before every step, a data-driven
    initialisation that only looks, and a record of every hook call."""

    penalty = 10.0

    def __init__(self, rank: int, alpha: float, **settings) -> None:
        super().__init__(rank, alpha, **settings)
        self.began: list[tuple[int, int]] = []
        self.calls: list[tuple[int, int, int, bool]] = []
        self.initialized: list[tuple[int, float]] = []
        self.transformed = 0

    def initialize(self, model: nn.Module, data: variants.InitData) -> dict[str, float]:
        for _ in range(3):  # forward passes in train mode: dropout draws random numbers
            batch = next(data.batches)
            self.initialized.append((len(batch["labels"]), float(data.loss(model, batch))))
        return {"first_loss": self.initialized[0][1]}

    def on_train_begin(self, model: nn.Module, total_steps: int) -> None:
        self.began.append((len(variants.layers_of(model)), total_steps))

    def adapter_loss(self, model: nn.Module) -> torch.Tensor:
        return self.penalty * sum(layer.lora_A.pow(2).sum() for layer in variants.layers_of(model).values())

    def transform_gradients(self, model: nn.Module, optimizer, lr: float) -> dict[str, float]:
        for layer in variants.layers_of(model).values():
            assert layer.lora_B.grad is not None  # after backward
            layer.lora_B.grad.zero_()
        self.transformed += 1
        return {"hook/transformed": float(self.transformed)}

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> dict[str, float]:
        layers = variants.layers_of(model)
        assert all(name.startswith("bert.encoder.layer.") for name in layers)
        has_grad = all(layer.lora_A.grad is not None for layer in layers.values())
        self.calls.append((len(layers), step, total_steps, has_grad))
        return {"hook/last_step": float(step)}


TRAINER = OmegaConf.create({
    "max_steps": 6, "epochs": None, "lr": 1e-2, "weight_decay": 0.0, "scheduler": "constant",
    "warmup_ratio": 0.0, "grad_clip": None, "log_every": 3, "eval_every": 6,
})


def hooked_run(minilm, tmp_path, variant="test-hooked-lora"):
    model, tokenizer = minilm
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    variants.inject_adapters(model, variant, ["query", "value"], rank=2, alpha=2, dropout=0.1)
    variants.mark_trainable(model, train_modules=["classifier"])
    train_set, eval_set = generate(32, 16)
    loader = make_loader(train_set, tokenizer, ["sentence"], 32, 8, shuffle=True, seed=0)
    eval_loader = make_loader(eval_set, tokenizer, ["sentence"], 32, 16, shuffle=False)
    return model, train_in_process(model, loader, eval_loader, TRAINER, tmp_path)


def test_hooks_are_called_with_all_layers_and_live_gradients(minilm, tmp_path):
    model, result = hooked_run(minilm, tmp_path)
    hooked = variants.variant_of(model)
    assert hooked.began == [(12, 6)] and hooked.transformed == 6
    assert hooked.calls == [(12, step, 6, True) for step in range(1, 7)]
    assert [n for n, _ in hooked.initialized] == [8, 8, 8]
    assert result.initialization == {"first_loss": hooked.initialized[0][1]}
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "hook/last_step" in line]
    assert len(logged) == 2 and '"hook/last_step": 6.0' in logged[-1] and '"hook/transformed": 6.0' in logged[-1]
    assert all('"train/adapter_loss"' in line for line in logged)
    # B's gradient was erased between backward and every step: B is still exactly zero.
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in variants.layers_of(model).values())
    assert result.step == 6 and set(result.eval_metrics) == {"loss", "accuracy"}


def test_the_penalty_is_part_of_the_optimised_loss(minilm, tmp_path):
    """With B held at zero the task loss gives A no gradient, so only the penalty moves A."""
    norm = lambda m: sum(layer.lora_A.pow(2).sum().item() for layer in variants.layers_of(m).values())
    torch.manual_seed(0)
    before = copy.deepcopy(minilm[0])
    variants.inject_adapters(before, "test-hooked-lora", ["query", "value"], rank=2, alpha=2, dropout=0.1)
    model, _ = hooked_run(minilm, tmp_path)
    assert norm(model) < 0.9 * norm(before)


@register_variant("test-erasing-lora")
class ErasingLoRA(variants.LoRA):
    """HookedLoRA without its initialisation: same layers, same penalty, B's gradient erased."""

    adapter_loss = HookedLoRA.adapter_loss
    transform_gradients = HookedLoRA.transform_gradients
    transformed = 0
    penalty = HookedLoRA.penalty


def test_a_data_driven_initialisation_leaves_the_runs_data_and_randomness_alone(minilm, tmp_path):
    """HookedLoRA's initialisation draws 3 batches and their dropout masks; the training after it
    must see the batches and masks that the same run without it sees, to the bit."""
    base = copy.deepcopy(minilm[0])
    hooked, _ = hooked_run(minilm, tmp_path / "hooked")
    plain, _ = hooked_run((base, minilm[1]), tmp_path / "plain", variant="test-erasing-lora")
    ours, theirs = hooked.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "trainer.batch_size=0 must be an integer >= 1"),
    ("lr=-1", "trainer.lr=-1.0 must be null or a finite number > 0"),
    ("weight_decay=x", "trainer.weight_decay='x' must be a finite number >= 0"),
    ("warmup_ratio=1.5", "trainer.warmup_ratio=1.5 must be a finite number in [0, 1)"),
    ("grad_clip=-2", "trainer.grad_clip=-2.0 must be null or a finite number >= 0"),
    ("epochs=0", "trainer.epochs=0.0 must be null or a finite number > 0"),
    ("scheduler=step", "trainer.scheduler='step' is not supported; allowed: linear, cosine"),
    ("checkpoint_every=0", "trainer.checkpoint_every=0 must be null or an integer >= 1"),
    ("weight_decay_on=some", "trainer.weight_decay_on='some' is not supported; allowed: matrices, all"),
    ("optimizer=sgd", "trainer.optimizer='sgd' is not supported; allowed: auto, adamw, paged_adamw_32bit, paged_adamw_8bit"),
    ("eval_every=sometimes", "trainer.eval_every='sometimes' must be a positive integer, epoch or epoch/N"),
    ("eval_every=epoch/0", "trainer.eval_every='epoch/0' must be a positive integer, epoch or epoch/N"),
    ("max_steps=null", "trainer.max_steps=None and trainer.epochs=None: the run needs a length"),
])
def test_trainer_config_errors_name_the_key(override, message):
    """Through the door run.py opens before Hydra (schema.groups.Trainer holds what each key allows)."""
    with pytest.raises(ConfigError, match=re.escape(message)) as failure:
        check_overrides([f"trainer.{override}"], Path(__file__).resolve().parents[1] / "conf")
    assert "\n" not in str(failure.value)


def test_eval_every_accepts_epoch_or_steps():
    assert plan_run(OmegaConf.create({"max_steps": 20, "eval_every": "epoch"}), 7).eval_every == 7
    assert plan_run(OmegaConf.create({"max_steps": 20, "eval_every": 5}), 7).eval_every == 5
    assert plan_run(OmegaConf.create({"max_steps": 20, "eval_every": "epoch/2"}), 7).eval_every == 4  # ceil(7 / 2)
    assert plan_run(OmegaConf.create({"max_steps": 20, "epochs": 1.5, "eval_every": 5}), 7).steps == 11  # ceil(10.5)


def test_the_metrics_training_computes_are_the_ones_the_schema_allows():
    """One list each: the schema's (what task.metrics may name) and what training computes."""
    from schema.groups import CLASSIFICATION_METRICS, LM_METRICS
    from training.metrics import LOWER_IS_BETTER, METRICS

    assert tuple(METRICS) == CLASSIFICATION_METRICS and set(LOWER_IS_BETTER) <= set(LM_METRICS)


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
    groups = optim.build(cfg, model, 10, torch.device("cpu")).optimizer.param_groups
    assert {g["weight_decay"] for g in groups} <= {0.0, 0.1}
    return tuple({n for g in groups if g["weight_decay"] == decay for n in g["param_names"]} for decay in (0.1, 0.0))


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


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (6, 100), (10, 10)])
def test_schedules_are_transformers_step_for_step(warmup, total):
    """Every schedule the config offers is transformers' ``get_scheduler(name)`` at its defaults
    (the oracle), at every step and past the end, and a restart at ``done_steps`` continues it."""
    assert set(optim.MULTIPLIERS) == set(SCHEDULERS)
    for name in SCHEDULERS:
        if name == "polynomial" and total == warmup:
            continue  # transformers divides by zero there
        ours, theirs = (torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=3e-4) for _ in range(2))
        schedule = optim.continuous_schedule(name, ours, warmup, total)
        reference = get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=total)
        restarted = optim.continuous_schedule(name, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=3e-4),
                                              warmup, total, done_steps=4)
        for step in range(total + 3):
            assert schedule.get_last_lr() == pytest.approx(reference.get_last_lr(), rel=1e-12, abs=0), (name, step)
            if step >= 4:
                assert restarted.get_last_lr() == schedule.get_last_lr(), (name, step)
                restarted.step()
            schedule.step()
            reference.step()
