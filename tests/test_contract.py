"""The interface contract, for every adapter variant alike: the wrapped model starts as its base
(where the method promises it), merge/unmerge give the same function, and a saved adapter
reproduces the trained model exactly on a fresh base model."""

import copy

import pytest
import torch

import variants

ADAPTERS = ["lora", "dora", "qlora", "adalora", "staged", "lora_ga", "lora_pro", "pissa", "milora", "eva", "olora", "vera",
            "hira", "gralora", "corda"]


def training_stand_in(model):
    """Move every adapter tensor, as training would (B, λ and m away from their start)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            for p in layer.adapter_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("variant", ADAPTERS)
def test_start_merge_and_exact_reload(minilm, batch, tmp_path, variant):
    model, _ = minilm
    base = copy.deepcopy(model)
    variants.inject_adapters(model, variant, ["query", "value"], rank=4, alpha=8, exclude=["classifier"])
    labelled = {**batch, "labels": torch.tensor([0, 1])}
    variants.variant_of(model).initialize(model, variants.InitData(iter([labelled] * 8), lambda m, b: m(**b).loss))
    model.eval()
    layers = variants.layers_of(model).values()
    with torch.no_grad():
        start = model(**batch).logits
        for layer in layers:  # the base the method runs on (QLoRA's: quantized)
            layer.active = False
        own_base = model(**batch).logits
        for layer in layers:
            layer.active = True
    assert torch.equal(start, own_base)
    if variant != "qlora":
        assert torch.equal(start, base(**batch).logits)

    training_stand_in(model)
    with torch.no_grad():
        trained = model(**batch).logits
    assert not torch.allclose(trained, start, atol=1e-4)
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    fresh = copy.deepcopy(base)
    assert variants.load_adapter(fresh, path)["variant"] == variant
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, trained)

        variants.merge_adapters(model)
        torch.testing.assert_close(model(**batch).logits, trained, atol=1e-4, rtol=1e-4)
        variants.unmerge_adapters(model)  # W0 + ΔW − ΔW: equal to W0 up to rounding
        torch.testing.assert_close(model(**batch).logits, trained, atol=1e-5, rtol=1e-5)
