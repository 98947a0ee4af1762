"""LoRA against the `peft` package on identical weights (peft is a test-only dependency)."""

import copy

import pytest
import torch
from helpers.close import assert_close_or_bf16

import variants

peft = pytest.importorskip("peft")


def peft_lora(model, targets, rank, alpha):
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none", task_type="SEQ_CLS"
    )
    return peft.get_peft_model(model, config)


def copy_weights_into_peft(ours, theirs):
    """Give peft's LoRA layers our A and B (randomised so ΔW ≠ 0)."""
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    ours_layers = variants.layers_of(ours)
    assert ours_layers.keys() == peft_layers.keys()
    with torch.no_grad():
        for name, layer in ours_layers.items():
            layer.lora_B.normal_(std=0.02)
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    return ours_layers, peft_layers


@pytest.mark.parametrize("targets", [["query", "value"], "all-linear"])
def test_forward_and_delta_weight_match_peft(minilm, batch, targets):
    model, _ = minilm
    theirs = peft_lora(copy.deepcopy(model), targets, rank=8, alpha=16).eval()
    variants.inject_adapters(model, "lora", targets, rank=8, alpha=16, exclude=["classifier"])
    ours_layers, peft_layers = copy_weights_into_peft(model, theirs)

    for name, layer in ours_layers.items():
        torch.testing.assert_close(layer.delta_weight(), peft_layers[name].get_delta_weight("default"), atol=1e-7, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=1e-5)


def test_merged_weights_match_peft(minilm):
    model, _ = minilm
    theirs = peft_lora(copy.deepcopy(model), ["query", "value"], rank=4, alpha=32).eval()
    variants.inject_adapters(model, "lora", ["query", "value"], rank=4, alpha=32)
    copy_weights_into_peft(model, theirs)
    variants.merge_adapters(model)
    merged_theirs = theirs.merge_and_unload()
    ours = {n.replace(".base.", "."): w for n, w in model.state_dict().items() if "lora_" not in n}
    for name, weight in merged_theirs.state_dict().items():
        torch.testing.assert_close(ours[name], weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("bf16", [False, True])
def test_rslora_scaling_matches_peft_use_rslora(minilm, batch, variant, bf16):
    """variant.scaling=rslora (α/√r) against peft's use_rslora on identical weights, rank 16,
    α = 8 (a factor of 2, where α/r would be 0.5): logits, A's and B's gradients, merged weights;
    fp32, and under CPU bf16 autocast to a few bf16 steps of the largest value."""
    model, _ = minilm
    config = peft.LoraConfig(r=16, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                             use_rslora=True, use_dora=variant == "dora", task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    variants.inject_adapters(model, variant, ["query", "value"], rank=16, alpha=8, scaling="rslora")
    variants.mark_trainable(model)
    ours_layers, peft_layers = copy_weights_into_peft(model, theirs)
    assert all(layer.scaling == 2.0 for layer in ours_layers.values())
    model.eval()
    theirs.eval()

    def close(got, expected, atol, rtol):
        assert_close_or_bf16(got, expected, atol, rtol, bf16)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ours_out, theirs_out = model(**batch).logits, theirs(**batch).logits
    close(ours_out, theirs_out, atol=1e-5, rtol=1e-5)
    ours_out.float().sum().backward()
    theirs_out.float().sum().backward()
    for name, layer in ours_layers.items():
        close(layer.lora_A.grad, peft_layers[name].lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        close(layer.lora_B.grad, peft_layers[name].lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
    variants.merge_adapters(model)
    merged_theirs = theirs.merge_and_unload().state_dict()
    for name, layer in ours_layers.items():
        torch.testing.assert_close(layer.base.weight, merged_theirs[f"{name}.weight"], atol=1e-6, rtol=1e-5)
