"""The baselines (full fine-tuning, BitFit, head only): exactly their parameters learn, a saved
run reloads to the same outputs, and the trainer takes their learning rate through the hook."""

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

import variants
from training import optim

ROOT = Path(__file__).resolve().parents[1]

HEAD = ["classifier"]
EMBEDDING_TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def expected_trainable(names, variant, settings):
    """The paper's definition of each baseline, written out over MiniLM's parameter names."""
    head = {n for n in names if n.startswith("classifier.")}
    if variant == "full":
        if settings.get("train_embeddings", True):
            return set(names)
        return {n for n in names if not any(f"embeddings.{t}." in n for t in EMBEDDING_TABLES)}
    if variant == "bitfit":
        biases = {n for n in names if n.endswith(".bias")}
        if settings.get("targets"):
            biases = {n for n in biases if n.endswith((".query.bias", ".intermediate.dense.bias"))}
        return biases | head
    return head


CASES = [
    ("full", {}),
    ("full", {"train_embeddings": False}),
    ("bitfit", {}),
    ("bitfit", {"targets": ["query", "intermediate.dense"]}),
    ("head", {"targets": HEAD}),
]


def train_steps(model, batch, steps=2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.tensor([0, 1])
    grads = set()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        grads |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("variant, settings", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_exactly_the_intended_parameters_get_gradients_and_change(minilm, batch, variant, settings, tmp_path):
    model, _ = minilm
    names = [n for n, _ in model.named_parameters()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert variants.inject_adapters(model, variant, exclude=HEAD, **settings) == []
    variants.mark_trainable(model, train_modules=HEAD)
    intended = expected_trainable(names, variant, settings)

    assert {n for n, p in model.named_parameters() if p.requires_grad} == intended
    assert train_steps(model, batch) == intended
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == intended
    trainable, total = variants.count_parameters(model)
    assert trainable == sum(before[n].numel() for n in intended) and total == sum(t.numel() for t in before.values())


@pytest.mark.parametrize("variant, settings", CASES, ids=[f"{v}-{s}" for v, s in CASES])
def test_save_then_load_reproduces_eval_outputs(_minilm, batch, variant, settings, tmp_path):
    pretrained = _minilm[0]
    model = copy.deepcopy(pretrained).eval()
    variants.inject_adapters(model, variant, exclude=HEAD, **settings)
    variants.mark_trainable(model, train_modules=HEAD)
    train_steps(model, batch)
    path = tmp_path / "trained.safetensors"
    variants.save_adapter(model, path)
    with safe_open(str(path), "pt") as f:
        saved = set(f.keys())
    assert saved == {n for n, p in model.named_parameters() if p.requires_grad}  # what trained, nothing else

    fresh = copy.deepcopy(pretrained).eval()
    config = variants.load_adapter(fresh, path)
    assert (config["variant"], config["rank"], config["modules"]) == (variant, None, [])
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
        assert not torch.equal(copy.deepcopy(pretrained).eval()(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("variant", ["full", "bitfit", "head", "lora", "dora", "adalora", "lora_pro"])
@pytest.mark.parametrize("override", [None, 5e-5])
def test_the_optimizer_takes_the_variants_own_learning_rate_unless_trainer_lr_is_given(_minilm, variant, override):
    """variant.lr (from the variant's YAML) is the rate; trainer.lr=..., when given, overrides it."""
    own = OmegaConf.load(ROOT / "conf" / "variant" / f"{variant}.yaml").get("lr")
    from hydra import compose, initialize_config_dir

    from training.experiment import variant_kwargs, with_variant_lr

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", [f"variant={variant}"] + ([f"trainer.lr={override}"] if override else []))
    cfg = with_variant_lr(cfg)
    model = copy.deepcopy(_minilm[0])
    targets = cfg.variant.get("targets")
    variants.inject_adapters(model, variant, list(targets) if targets is not None else None, rank=8, alpha=16,
                             exclude=["classifier"], **variant_kwargs(cfg.variant))
    opt = optim.build(cfg.trainer, model, 10, torch.device("cpu"))
    assert own is not None and opt.optimizer.param_groups[0]["lr"] == (override or own)


@pytest.mark.parametrize(
    "variant, settings, message",
    [
        ("full", {"train_embeddings": "no"}, "variant.train_embeddings='no' must be true or false"),
        ("bitfit", {"targets": ["LayerNorm.weight"]}, "variant.targets=['LayerNorm.weight'] names no module with a bias"),
        ("head", {"targets": None}, "variant=head needs variant.targets"),
        ("head", {"targets": ["q_proj"]}, "variant.targets=['q_proj'] names no module with parameters"),
    ],
)
def test_bad_settings_are_clear_errors_and_leave_the_model_alone(minilm, variant, settings, message):
    model, _ = minilm
    with pytest.raises(variants.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        variants.inject_adapters(model, variant, **settings)
    assert variants.adapter_config(model) == {} and all(p.requires_grad for p in model.parameters())
