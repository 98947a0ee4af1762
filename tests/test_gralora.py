"""GraLoRA: ΔW is the k × k grid of s·B_ij·A_ij, assembled by hand on a small layer (its rank is
k·r, above r; k = 1 is LoRA); against peft's GraLoRA on identical weights on MiniLM's W_q, W_v
and SmolLM2's q_proj, v_proj, plain and hybrid (the start, outputs, gradients, merged weights;
fp32 and bf16 autocast; dropout masks); peft loads the exported adapter; bad settings are one
line and leave the model alone. (Start as the base model, merge/unmerge and exact reload on a
fresh base: tests/test_contract.py.)"""

import copy

import pytest
import torch
from helpers.close import assert_dropout_draws_as_peft, assert_merged_as_peft, forward_backward_both
from torch import nn

import variants
from variants.interop.peft_format import save_peft_adapter
from variants.methods.gralora import peft_layout
from variants.methods.lora import LoRALinear

peft = pytest.importorskip("peft")

MODELS = {"minilm": (["query", "value"], "SEQ_CLS", "batch"),
          "smollm2": (["q_proj", "v_proj"], "CAUSAL_LM", "smollm2_batch")}


def small_layer(rank=4, k=2, hybrid_r=0, d=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d))
    variants.inject_adapters(model, "gralora", ["0"], rank=rank, alpha=6, k=k, hybrid_r=hybrid_r)
    layer = model[0]
    randomize({"0": layer})
    return model, layer


def randomize(layers, seed=0):
    """Every B off zero (ΔW ≠ 0), as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for param in [layer.gralora_B] + ([layer.hybrid_B] if layer.hybrid_rank else []):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("k, hybrid_r, rank, expected_rank", [(2, 0, 4, 8), (4, 0, 4, 12), (2, 2, 6, 10)])
def test_delta_is_the_block_matrix_by_hand_and_of_rank_above_r(k, hybrid_r, rank, expected_rank):
    """12 × 12: block (i, j) of ΔW is s·B[i, j]·A[i, j]; its rank is k·(r − h) + h (capped at 12)."""
    model, layer = small_layer(rank, k, hybrid_r)
    s, size = 6 / rank, 12 // k
    assert layer.scaling == s and layer.block_rank == (rank - hybrid_r) // k
    hand = torch.zeros(12, 12)
    for i in range(k):
        for j in range(k):
            hand[i * size:(i + 1) * size, j * size:(j + 1) * size] = s * layer.gralora_B[i, j] @ layer.gralora_A[i, j]
    if hybrid_r:
        hand += s * layer.hybrid_B @ layer.hybrid_A
    torch.testing.assert_close(layer.delta_weight(), hand.detach(), atol=1e-7, rtol=1e-6)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (layer.base.weight + hand).t() + layer.base.bias, atol=1e-6, rtol=1e-6)
    assert torch.linalg.matrix_rank(hand) == expected_rank > rank


def test_k_1_is_lora():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    model = nn.Sequential(copy.deepcopy(base))
    variants.inject_adapters(model, "gralora", ["0"], rank=4, alpha=8, k=1)
    layer = model[0]
    randomize({"0": layer})
    lora = LoRALinear(base, 4, 8)
    with torch.no_grad():
        lora.lora_A.copy_(layer.gralora_A[0, 0])
        lora.lora_B.copy_(layer.gralora_B[0, 0])
        x = torch.randn(3, 12)
        torch.testing.assert_close(model(x), lora(x), atol=1e-6, rtol=1e-6)


def paired(request, model_name, rank=8, k=2, hybrid_r=0, dropout=0.0):
    """(ours, peft's, batch, our layers, peft's layers): the same model, GraLoRA of total rank
    ``rank`` (peft's r = rank − hybrid_r, α/(r + hybrid_r) = α/rank)."""
    targets, task, batch_name = MODELS[model_name]
    model, _ = request.getfixturevalue(model_name)
    batch = request.getfixturevalue(batch_name)
    config = peft.GraloraConfig(r=rank - hybrid_r, hybrid_r=hybrid_r, alpha=16, gralora_k=k, gralora_dropout=dropout,
                                target_modules=targets, task_type=task)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    variants.inject_adapters(model, "gralora", targets, rank=rank, alpha=16, k=k, hybrid_r=hybrid_r, dropout=dropout)
    ours = variants.layers_of(model)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.gralora.GraloraLayer)}
    assert ours.keys() == peft_layers.keys() and len(ours) == (12 if model_name == "minilm" else 4)
    assert all(layer.scaling == peft_layers[name].scaling["default"] == 2.0 for name, layer in ours.items())
    return model, theirs, batch, ours, peft_layers


def peft_params(layer):
    """peft's adapter tensors of one layer, under the names of ``GraLoRALinear.peft_tensors``."""
    params = {"gralora_A": layer.gralora_A["default"], "gralora_B": layer.gralora_B["default"]}
    if layer.hybrid_r["default"]:
        params["gralora_A_general.weight"] = layer.gralora_A_general["default"].weight
        params["gralora_B_general.weight"] = layer.gralora_B_general["default"].weight
    return params


def copy_into_peft(ours, peft_layers):
    with torch.no_grad():
        for name, layer in ours.items():
            theirs = peft_params(peft_layers[name])
            for key, tensor in layer.peft_tensors().items():
                theirs[key].copy_(tensor)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_the_start_is_peft_s(request, model_name):
    """Every A uniform in ±1/√(d_in/k) (peft's Kaiming over an input slice), the hybrid A in
    ±1/√d_in, every B zero: ΔW = 0, both are the base model."""
    model, theirs, batch, ours, peft_layers = paired(request, model_name, hybrid_r=2)
    for name, layer in ours.items():
        theirs_params = peft_params(peft_layers[name])
        for key, bound in (("gralora_A", (layer.in_features / 2) ** -0.5),
                           ("gralora_A_general.weight", layer.in_features ** -0.5)):
            for a in (layer.peft_tensors()[key], theirs_params[key]):
                assert 0.95 * bound < a.abs().max() <= bound
        assert not layer.gralora_B.any() and not layer.hybrid_B.any()
        assert not theirs_params["gralora_B"].any() and not theirs_params["gralora_B_general.weight"].any()
    with torch.no_grad(), theirs.disable_adapter():
        expected = theirs(**batch).logits
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected) and torch.equal(theirs(**batch).logits, expected)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("hybrid_r", [0, 4])
@pytest.mark.parametrize("bf16", [False, True])
def test_outputs_gradients_and_merged_weights_match_peft(request, model_name, hybrid_r, bf16):
    """Identical tensors (B random; ours turned into peft's layout): logits, every adapter
    tensor's gradient (peft's turned into ours), ΔW, in fp32 and under CPU bf16 autocast, and
    the merged weights. Under bf16 the bound is 1% of the largest value (helpers/close.py's 5%
    would not see a wrong update on SmolLM2).
    Gradients get 2%: a bf16 step is 0.4-0.8% of a value, and SmolLM2's largest gradients came out
    two steps apart in one run of three (GraLoRA, 512 at 4.8e4; the hybrid part's, 8192 at 6.9e5)."""
    model, theirs, batch, ours, peft_layers = paired(request, model_name, hybrid_r=hybrid_r)
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
        grads = {key: param.grad for key, param in peft_params(peft_layers[name]).items()}
        close(peft_layout(layer.gralora_A.grad, layer.gralora_B.grad)[0], grads["gralora_A"], atol=1e-5, rtol=1e-4, bf16_share=2e-2)
        close(peft_layout(layer.gralora_A.grad, layer.gralora_B.grad)[1], grads["gralora_B"], atol=1e-5, rtol=1e-4, bf16_share=2e-2)
        if hybrid_r:
            close(layer.hybrid_A.grad, grads["gralora_A_general.weight"], atol=1e-5, rtol=1e-4, bf16_share=2e-2)
            close(layer.hybrid_B.grad, grads["gralora_B_general.weight"], atol=1e-5, rtol=1e-4, bf16_share=2e-2)
        with torch.no_grad():
            torch.testing.assert_close(layer.delta_weight(), peft_layers[name].get_delta_weight("default"),
                                       atol=1e-7, rtol=1e-6)
    assert_merged_as_peft(model, theirs, ours, atol=1e-7, rtol=1e-6)


def test_adapter_dropout_draws_as_peft(request):
    """Train mode, dropout 0.5, hybrid: the blocks' and the hybrid LoRA's masks drawn in the same
    order as peft give the same outputs; other masks give others."""
    model, theirs, batch, ours, peft_layers = paired(request, "minilm", hybrid_r=4, dropout=0.5)
    randomize(ours)
    copy_into_peft(ours, peft_layers)
    assert_dropout_draws_as_peft(model, theirs, batch, atol=1e-5, other_atol=1e-4)


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_peft_loads_the_exported_classifier_adapter(minilm, batch, tmp_path, hybrid_r):
    """peft's own GraLoRA format (LoRA's cannot hold it), its r the blocks' share."""
    model, _ = minilm
    fresh = copy.deepcopy(model)
    variants.inject_adapters(model, "gralora", ["query", "value"], rank=6, alpha=12, k=2, hybrid_r=hybrid_r)
    randomize(variants.layers_of(model))
    with torch.no_grad():
        model.classifier.weight.add_(0.1)
    config = save_peft_adapter(model, tmp_path, "classification", trained=["classifier.weight", "classifier.bias"])
    assert config["peft_type"] == "GRALORA" and config["r"] == 6 - hybrid_r and config["hybrid_r"] == hybrid_r
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_peft_loads_the_exported_causal_lm_adapter(smollm2, smollm2_batch, tmp_path):
    model, _ = smollm2
    fresh = copy.deepcopy(model)
    variants.inject_adapters(model, "gralora", ["q_proj", "v_proj"], rank=8, alpha=16, k=4)
    randomize(variants.layers_of(model))
    save_peft_adapter(model, tmp_path, "causal_lm", trained=[])
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**smollm2_batch).logits, model(**smollm2_batch).logits, atol=1e-4,
                                   rtol=1e-4)


def test_gralora_has_no_lora_form_and_lora_s_parameter_count():
    _, layer = small_layer(rank=6, hybrid_r=2)
    assert sum(p.numel() for p in layer.adapter_parameters()) == 6 * (12 + 12)
    assert variants.get_variant("gralora").parameters_at_rank(12, 12, 6) == 6 * 24
    with pytest.raises(NotImplementedError, match="GraLoRALinear has no equivalent LoRA"):
        layer.as_lora()
    with pytest.raises(NotImplementedError, match="variant 'gralora' has no low-rank factors"):
        variants.get_variant("gralora").low_rank_factors({})


@pytest.mark.parametrize("settings, message", [
    ({"k": 3}, r"^variant.k=3 must divide rank - hybrid_r = 8, the rank the blocks share; allowed: 1, 2, 4, 8$"),
    ({"k": 4, "hybrid_r": 2}, r"^variant.k=4 must divide rank - hybrid_r = 6, .*; allowed: 1, 2, 3, 6$"),
    ({"hybrid_r": 8}, r"^variant.hybrid_r=8 must be an integer in \[0, rank\) \(rank=8"),
    ({"k": 0}, r"^variant.k=0 must be an integer >= 1$"),
    ({"hybrid_r": -1}, r"^variant.hybrid_r=-1 must be an integer >= 0$"),
])
def test_bad_settings(settings, message):
    with pytest.raises(variants.ConfigError, match=message):
        variants.get_variant("gralora").create(rank=8, alpha=16, **settings)


def test_a_k_that_does_not_divide_the_layer_is_one_line_and_leaves_the_model_alone(minilm):
    """MiniLM's 384 = 2⁷·3: k = 5 divides rank 10 but not the layers; allowed: what divides both."""
    model, _ = minilm
    before = copy.deepcopy(model.state_dict())
    message = (r"^variant.k=5 must divide d_in and d_out of every targeted layer "
               r"\(bert.encoder.layer.0.attention.self.query: d_in=384, d_out=384\); allowed: 1, 2$")
    with pytest.raises(variants.ConfigError, match=message):
        variants.inject_adapters(model, "gralora", ["query", "value"], rank=10, alpha=20, k=5)
    assert not variants.layers_of(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
