"""HiRA: ΔW = s·W0 ⊙ (B·A) checked by hand on a small layer (its rank exceeds r; merge and unmerge
give W0 back exactly); against peft's HiRA on identical weights on MiniLM's W_q, W_v and
SmolLM2's q_proj, v_proj (the start, outputs, gradients, merged weights; fp32 and bf16 autocast;
dropout masks); peft loads the exported adapter; bad settings are one line. (Start as the base
model, merge/unmerge and exact reload on a fresh base: tests/test_contract.py.)"""

import copy

import pytest
import torch
from helpers.close import assert_dropout_draws_as_peft, assert_merged_as_peft, forward_backward_both
from torch import nn

import variants
from variants.interop.peft_format import save_peft_adapter

peft = pytest.importorskip("peft")

MODELS = {"minilm": (["query", "value"], "SEQ_CLS", "batch"),
          "smollm2": (["q_proj", "v_proj"], "CAUSAL_LM", "smollm2_batch")}


def small_layer(d_out=5, d_in=7, rank=2, **settings):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    variants.inject_adapters(model, "hira", ["0"], rank=rank, alpha=6, **settings)
    layer = model[0]
    with torch.no_grad():
        layer.hira_B.normal_()
    return model, layer


def test_delta_is_the_hadamard_product_with_w0_by_hand_and_of_high_rank():
    model, layer = small_layer(scaling="standard")
    w0, a, b = layer.base.weight.detach().clone(), layer.hira_A.detach(), layer.hira_B.detach()
    s = 6 / 2
    hand = torch.empty_like(w0)
    for i in range(w0.shape[0]):
        for j in range(w0.shape[1]):
            hand[i, j] = w0[i, j] * s * sum(b[i, q] * a[q, j] for q in range(2))
    torch.testing.assert_close(layer.delta_weight(), hand, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, 4, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (w0 + hand).t() + layer.base.bias, atol=1e-6, rtol=1e-6)
    assert torch.linalg.matrix_rank(b @ a) == 2
    assert torch.linalg.matrix_rank(hand) == 5  # W0 ⊙ B·A is full rank, above r = 2


def test_scaling_none_ignores_alpha_and_merge_unmerge_restores_w0_exactly():
    model, layer = small_layer()
    assert layer.scaling == 1.0
    w0 = layer.base.weight.detach().clone()
    delta = layer.delta_weight().detach()
    torch.testing.assert_close(delta, w0 * (layer.hira_B @ layer.hira_A), atol=0, rtol=0)
    x = torch.randn(4, 7)
    with torch.no_grad():
        before = model(x)
        variants.merge_adapters(model)
        torch.testing.assert_close(layer.base.weight, w0 + delta, atol=0, rtol=0)
        assert torch.equal(layer.frozen_weight(), w0) and torch.equal(layer.delta_weight(), delta)  # from W0
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
        variants.unmerge_adapters(model)
    assert torch.equal(layer.base.weight, w0) and layer.weight_before_merge is None  # W0 itself, bit for bit
    assert "weight_before_merge" not in layer.state_dict()


def randomize(layers, seed=0):
    """B off zero (ΔW ≠ 0), as training would: entries of B·A ~ 0.15, changing each entry of W0 by ~15%."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.hira_B.copy_(2 * torch.randn(layer.hira_B.shape, generator=gen))


def paired(request, model_name, rank=8, dropout=0.0):
    """(ours, peft's, batch, our layers, peft's layers) on the same weights, B randomized."""
    targets, task, batch_name = MODELS[model_name]
    model, _ = request.getfixturevalue(model_name)
    batch = request.getfixturevalue(batch_name)
    config = peft.HiraConfig(r=rank, target_modules=targets, hira_dropout=dropout, task_type=task)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    variants.inject_adapters(model, "hira", targets, rank=rank, alpha=16, dropout=dropout)
    ours = variants.layers_of(model)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.hira.HiraLayer)}
    assert ours.keys() == peft_layers.keys() and len(ours) == (12 if model_name == "minilm" else 4)
    return model, theirs, batch, ours, peft_layers


def copy_into_peft(ours, peft_layers):
    with torch.no_grad():
        for name, layer in ours.items():
            peft_layers[name].hira_A["default"].copy_(layer.hira_A)
            peft_layers[name].hira_B["default"].copy_(layer.hira_B)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_the_start_is_peft_s(request, model_name):
    """A Kaiming-uniform (bound 1/√d_in) and B = 0 in both: ΔW = 0, both are the base model."""
    model, theirs, batch, ours, peft_layers = paired(request, model_name)
    base = copy.deepcopy(model)
    for name, layer in ours.items():
        bound = layer.in_features ** -0.5
        for a in (layer.hira_A, peft_layers[name].hira_A["default"]):
            assert 0.95 * bound < a.abs().max() <= bound
        assert not layer.hira_B.any() and not peft_layers[name].hira_B["default"].any()
    for layer in variants.layers_of(base).values():
        layer.active = False
    with torch.no_grad():
        expected = base(**batch).logits
        assert torch.equal(model(**batch).logits, expected)
        assert torch.equal(theirs(**batch).logits, expected)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("bf16", [False, True])
def test_outputs_gradients_and_merged_weights_match_peft(request, model_name, bf16):
    """Identical A and B (B random): logits, A's and B's gradients and ΔW in fp32 and under CPU
    bf16 autocast, and the merged weights. The layer computes in peft's order (B·A, ⊙ W0, one more
    GEMM over the dropped input, added to the base output), so the two agree to the bit on this
    CPU; under bf16 the bound is 1% of the largest value (helpers/close.py's 5% would not see a
    wrong ΔW on SmolLM2, where the whole update moves the logits by 2% of their largest).
    Gradients get 2%: a bf16 step is 0.4-0.8% of a value, and SmolLM2's largest gradients came out
    two steps apart in one run of three (GraLoRA, 512 at 4.8e4)."""
    model, theirs, batch, ours, peft_layers = paired(request, model_name)
    randomize(ours)
    copy_into_peft(ours, peft_layers)
    model.eval()
    theirs.eval()

    def close(got, expected, atol, rtol, bf16_share=1e-2):
        if bf16:
            atol, rtol = bf16_share * expected.abs().max().item(), 0.0
        torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)

    ours_out = forward_backward_both(model, theirs, batch, bf16,
                                     lambda got, expected: close(got, expected, atol=1e-5, rtol=1e-5))
    with torch.no_grad(), theirs.disable_adapter():  # ΔW matters: the base model's logits are farther off
        base_out = theirs(**batch).logits
    assert (ours_out.detach().float() - base_out).abs().max() > 0.03 * base_out.abs().max()
    for name, layer in ours.items():
        ref = peft_layers[name]
        close(layer.hira_A.grad, ref.hira_A["default"].grad, atol=1e-4, rtol=1e-4, bf16_share=2e-2)
        close(layer.hira_B.grad, ref.hira_B["default"].grad, atol=1e-4, rtol=1e-4, bf16_share=2e-2)
        with torch.no_grad():
            # peft's get_delta_weight is B·A; its merge multiplies it by W0
            torch.testing.assert_close(layer.delta_weight(),
                                       ref.get_base_layer().weight * ref.get_delta_weight("default"),
                                       atol=1e-7, rtol=1e-6)
    assert_merged_as_peft(model, theirs, ours, atol=1e-7, rtol=1e-6)


def test_adapter_dropout_acts_on_the_adapter_input_as_in_peft(request):
    """Train mode, dropout 0.5: the same masks (one per layer, drawn in the same order) give the
    same outputs; other masks give others."""
    model, theirs, batch, ours, peft_layers = paired(request, "minilm", dropout=0.5)
    randomize(ours)
    copy_into_peft(ours, peft_layers)
    assert_dropout_draws_as_peft(model, theirs, batch, atol=1e-5, other_atol=1e-3)


@pytest.mark.parametrize("scaling", ["none", "standard"])
def test_peft_loads_the_exported_classifier_adapter(minilm, batch, tmp_path, scaling):
    """peft's own HiRA format (LoRA's cannot hold it); s = α/r is folded into B for peft."""
    model, _ = minilm
    fresh = copy.deepcopy(model)
    variants.inject_adapters(model, "hira", ["query", "value"], rank=4, alpha=8, scaling=scaling)
    randomize(variants.layers_of(model))
    with torch.no_grad():
        model.classifier.weight.add_(0.1)
    config = save_peft_adapter(model, tmp_path, "classification", trained=["classifier.weight", "classifier.bias"])
    assert config["peft_type"] == "HIRA" and config["r"] == 4 and config["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_peft_loads_the_exported_causal_lm_adapter(smollm2, smollm2_batch, tmp_path):
    model, _ = smollm2
    fresh = copy.deepcopy(model)
    variants.inject_adapters(model, "hira", ["q_proj", "v_proj"], rank=4, alpha=8)
    randomize(variants.layers_of(model))
    save_peft_adapter(model, tmp_path, "causal_lm", trained=[])
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**smollm2_batch).logits, model(**smollm2_batch).logits, atol=1e-4,
                                   rtol=1e-4)


def test_hira_has_no_lora_form():
    _, layer = small_layer()
    with pytest.raises(NotImplementedError, match="HiRALinear has no equivalent LoRA"):
        layer.as_lora()
    with pytest.raises(NotImplementedError, match="variant 'hira' has no low-rank factors"):
        variants.get_variant("hira").low_rank_factors({})


@pytest.mark.parametrize("settings, message", [
    ({"scaling": "rslora"}, "variant.scaling='rslora' is not supported; allowed: none, standard"),
    ({"init": "zero"}, "variant.init='zero' is not supported; allowed: kaiming, gaussian"),
    ({"dropout": 1.0}, r"variant.dropout=1.0 must be a finite number in \[0, 1\)"),
])
def test_bad_settings(settings, message):
    with pytest.raises(variants.ConfigError, match=message):
        variants.get_variant("hira").create(rank=4, alpha=8, **settings)
