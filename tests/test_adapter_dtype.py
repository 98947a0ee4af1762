"""Adapters train in fp32 over a checkpoint loaded in bf16 or fp16 (as peft casts its adapters)."""

import copy

import pytest
import torch

import variants

ADAPTERS = {"lora": {}, "dora": {}, "adalora": {"target_rank": 4}, "staged": {}, "qlora": {}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_adapters_train_in_fp32_over_a_low_precision_base(minilm, batch, variant, dtype):
    if dtype == torch.float16 and variant == "qlora":
        pytest.skip("bitsandbytes' CPU 4-bit path computes in fp32 or bf16")
    model = minilm[0].to(dtype)
    base = copy.deepcopy(model)
    variants.inject_adapters(model, variant, ["query", "value"], rank=6, alpha=12, exclude=["classifier"],
                             **ADAPTERS[variant])
    variants.mark_trainable(model, train_modules=["classifier"])
    adapter = [p for layer in variants.layers_of(model).values() for p in layer.adapter_parameters()]
    assert adapter and {p.dtype for p in adapter} == {torch.float32}
    if variant != "qlora":  # a zero-initialised adapter leaves the low-precision model's outputs as they were
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, base(**batch).logits)

    optimizer = torch.optim.AdamW(adapter, lr=1e-4)
    before = [p.detach().clone() for p in adapter]
    model.train()
    logits = model(**batch).logits
    assert logits.dtype == dtype
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter if p.requires_grad)
    optimizer.step()
    assert {p.dtype for p in adapter} == {torch.float32}
    assert any(not torch.equal(p, b) for p, b in zip(adapter, before))
