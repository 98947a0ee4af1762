"""OLoRA: the start is the first r columns of W0's QR, checked by hand; the factors, frozen
residual, outputs, gradients and merged weights against peft's ``init_lora_weights="olora"`` on
MiniLM's and SmolLM2's layers, fp32 and bf16 autocast. (Start as the base model, merge/unmerge and
exact reload on a fresh base: tests/test_contract.py.)"""

import copy

import pytest
import torch
from helpers.close import assert_close_or_bf16, assert_merged_as_peft, forward_backward_both
from torch import nn

import variants


def test_the_start_is_q_and_r_truncated_and_the_residual_the_rest():
    """B₀ = Q[:, :r] (orthonormal columns), A₀ = R[:r] (upper triangular rows), s·B₀·A₀ + W_res = W0,
    and the model starts as its base exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10))
    w0 = model[0].weight.detach().clone()
    variants.inject_adapters(model, "olora", ["0"], rank=3, alpha=6)  # s = 2
    layer = model[0]
    q, r = torch.linalg.qr(w0)
    torch.testing.assert_close(layer.lora_B0, q[:, :3])
    torch.testing.assert_close(layer.lora_A0, r[:3])
    torch.testing.assert_close(layer.lora_B0.t() @ layer.lora_B0, torch.eye(3), atol=1e-6, rtol=0)
    assert not torch.tril(layer.lora_A0[:, :3], diagonal=-1).any()
    torch.testing.assert_close(layer.initial_weight() + 2 * layer.lora_B0 @ layer.lora_A0, w0, atol=1e-6, rtol=0)
    assert not layer.delta_weight().any()


peft = pytest.importorskip("peft")

MODELS = {"minilm": (["query", "value"], "SEQ_CLS"), "smollm2": (["q_proj", "v_proj"], "CAUSAL_LM")}


def peft_layers_of(theirs):
    return {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("bf16", [False, True])
def test_start_outputs_gradients_and_merge_match_peft_olora(request, which, bf16):
    """On identical weights (rank 8, α = 32: s = 4, so the undivided factors matter): A₀, B₀ and the
    residual W0 − s·B₀·A₀ as peft's; then with B moved (as training would), the outputs, A's and B's
    gradients and the merged weights; fp32, and under bf16 autocast to a few bf16 steps."""
    model, _ = request.getfixturevalue(which)
    batch = request.getfixturevalue("batch" if which == "minilm" else "smollm2_batch")
    targets, task = MODELS[which]
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=targets, init_lora_weights="olora", task_type=task)
    theirs = peft.get_peft_model(copy.deepcopy(model), config).eval()
    variants.inject_adapters(model, "olora", targets, rank=8, alpha=32)
    variants.mark_trainable(model)
    ours, peft_layers = variants.layers_of(model), peft_layers_of(theirs)
    assert ours.keys() == peft_layers.keys() and len(ours) == (12 if which == "minilm" else 4)
    gen = torch.Generator().manual_seed(0)
    for name, layer in ours.items():
        ref = peft_layers[name]
        torch.testing.assert_close(layer.lora_A, ref.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B, ref.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.initial_weight(), ref.get_base_layer().weight, atol=1e-6, rtol=1e-5)
        with torch.no_grad():  # the same step away from the start in both
            step = 0.02 * torch.randn(layer.lora_B.shape, generator=gen)
            layer.lora_B.add_(step)
            ref.lora_B["default"].weight.add_(step)

    def close(got, expected):  # to 1e-5 of the largest value in fp32 (SmolLM2's gradients reach 1e6)
        assert_close_or_bf16(got, expected, 1e-5 * expected.abs().max().item(), 0.0, bf16)

    forward_backward_both(model, theirs, batch, bf16, close)
    for name, layer in ours.items():
        ref = peft_layers[name]
        close(layer.lora_A.grad, ref.lora_A["default"].weight.grad)
        close(layer.lora_B.grad, ref.lora_B["default"].weight.grad)
    assert_merged_as_peft(model, theirs, ours, atol=1e-5, rtol=1e-5)
