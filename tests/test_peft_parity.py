"""LoRA against the `peft` package on identical weights (peft is a test-only dependency)."""

import copy

import pytest
import torch

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
    ours_layers = dict(variants.adapter_layers(ours))
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
