"""LoftQ (``variant=qlora variant.init=loftq``): Algorithm 1 checked by hand on a small layer; the
start's errors; the start (A, B and the dequantized base), outputs, gradients and merged weights
against peft's ``init_lora_weights="loftq"`` on MiniLM's and SmolLM2's layers, fp32 and bf16
autocast; the contract (the base the layers run on, exact reload on a fresh fp32 base, merge);
bad settings are one line; no peft-format export."""

import copy
import inspect

import pytest
import torch
from helpers.close import assert_close_or_bf16, assert_merged_as_peft, forward_backward_both
from torch import nn

import variants
from variants.methods.loftq import loftq_start
from variants.methods.qlora import QLoRALinear, dequantized_weight, quantize_model, quantized_matrix
from variants.targets import task_head

QUANT = {"quant_type": "nf4", "double_quant": False, "blocksize": 64, "compute_dtype": "fp32"}


def svd_r(matrix, rank):
    """B·A with B = U_r·√S_r, A = √S_r·V_rᵀ (Eq. 8; the product so grouped, as the quantizer's input
    must be bit for bit: U_r·S_r·V_rᵀ rounds differently and moves a few codes)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root) @ (root[:, None] * vh[:rank])


def test_bitsandbytes_cpu_quantization_is_deterministic():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    for double_quant in (False, True):
        args = {**QUANT, "double_quant": double_quant}
        assert torch.equal(quantized_matrix(weight, **args), quantized_matrix(weight.clone(), **args))


@pytest.mark.parametrize("divide_scaling", [False, True])
def test_algorithm_1_by_hand(divide_scaling):
    """T = 2 on a 64 × 128 layer, α = 8, r = 4 (s = 2): Q₁ = q(W0), B₁A₁ = SVD_r(W0 − Q₁), the base
    holds Q₂ = q(W0 − B₁A₁) and B·A = SVD_r(W0 − Q₂), divided by s with ``divide_scaling``."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 128, generator=gen) * 0.05)
    w0 = linear.weight.detach().clone()
    layer = QLoRALinear(copy.deepcopy(linear), rank=4, alpha=8, quant_args=QUANT, init="loftq", loftq_iter=2,
                        loftq_divide_scaling=divide_scaling)
    q1 = quantized_matrix(w0, **QUANT)
    q2 = quantized_matrix(w0 - svd_r(w0 - q1, 4), **QUANT)
    assert torch.equal(dequantized_weight(layer.base), q2)  # the base holds the codes of W0 − B₁A₁
    assert not torch.equal(q2, q1)
    torch.testing.assert_close(layer.base.bias, linear.bias, atol=0, rtol=0)
    fit = svd_r(w0 - q2, 4)
    factor = layer.scaling if divide_scaling else 1.0
    torch.testing.assert_close(factor * layer.lora_B @ layer.lora_A, fit, atol=1e-6, rtol=0)
    # the errors it reports, by hand
    errors = layer.loftq_errors
    assert errors["quantized"] == pytest.approx(((w0 - q1).norm() / w0.norm()).item(), rel=1e-5)
    assert errors["fit"] == pytest.approx(((w0 - q2 - fit).norm() / w0.norm()).item(), rel=1e-5)
    start = w0 - q2 - layer.scaling * layer.lora_B @ layer.lora_A
    assert errors["start"] == pytest.approx((start.norm() / w0.norm()).item(), rel=1e-5)
    assert errors["fit"] < errors["quantized"]
    # ‖W0 − Q − s·B·A‖² = ‖W0 − Q − SVD_r‖² + (1 − s)²‖SVD_r‖²: peft's factors at s = 2 lose the gain
    expected = errors["fit"] if divide_scaling else ((w0 - q2 - 2 * fit).norm() / w0.norm()).item()
    assert errors["start"] == pytest.approx(expected, rel=1e-4)
    x = torch.randn(3, 128, generator=gen)
    with torch.no_grad():  # the layer computes Q_T·x + s·B·A·x + bias
        torch.testing.assert_close(layer(x), x @ (q2 + layer.delta_weight()).t() + linear.bias, atol=1e-5, rtol=1e-5)


def test_one_iteration_keeps_qloras_base_and_more_iterations_fit_better(minilm):
    """T = 1: the base is q(W0), QLoRA's own, bit for bit. The fit error shrinks with T and r."""
    model, _ = minilm
    query = model.bert.encoder.layer[0].attention.self.query
    w0 = query.weight.detach().clone()
    plain = QLoRALinear(copy.deepcopy(query), 8, 8, quant_args=QUANT)
    loftq = QLoRALinear(copy.deepcopy(query), 8, 8, quant_args=QUANT, init="loftq")
    assert torch.equal(dequantized_weight(loftq.base), dequantized_weight(plain.base))
    quantize = lambda w: quantized_matrix(w, **QUANT)
    fits = {(t, r): loftq_start(w0, r, quantize, t, 1.0).errors["fit"] for t in (1, 3) for r in (8, 16)}
    assert fits[(3, 8)] < fits[(1, 8)] < loftq.loftq_errors["quantized"]
    assert fits[(1, 16)] < fits[(1, 8)] and fits[(3, 16)] < fits[(3, 8)]


peft = pytest.importorskip("peft")

MODELS = {"minilm": (["query", "value"], "SEQ_CLS"), "smollm2": (["q_proj", "v_proj"], "CAUSAL_LM")}


@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """peft's ``loftq_init`` as it is, but run on the CPU: it sends the weight to "cuda" (or "xpu")
    unconditionally, so the test runs its source with that one device name replaced."""
    import peft.tuners.lora.layer as peft_layer
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    device = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert device in source, "peft's loftq_init changed: update this fixture"
    namespace = dict(vars(loftq_utils))
    exec(source.replace(device, 'compute_device = "cpu"'), namespace)  # noqa: S102  (peft's code, CPU device)
    monkeypatch.setattr(peft_layer, "loftq_init", namespace["loftq_init"])


@pytest.mark.usefixtures("peft_loftq_on_cpu")
@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("bf16", [False, True])
def test_start_outputs_gradients_and_merge_match_peft_loftq(request, which, bf16):
    """peft's LoftQ (LoftQConfig(loftq_bits=4, loftq_iter=2)) on identical weights, rank 8, α = 16 (s = 2:
    peft does not divide the factors by s, nor do we by default): the same A, B and dequantized base
    (peft keeps an fp32 layer holding q's dequantized Q_T; ours holds the NF4 codes, quantized as peft's
    loop does: nf4, blocks of 64, no double quantization), bit for bit; the rest of the model quantized
    alike in both (QLoRA quantizes every linear layer, peft's LoftQ only the targets). Then with B moved:
    outputs, A's and B's gradients and merged weights; fp32, and under bf16 autocast to a few bf16 steps."""
    model, _ = request.getfixturevalue(which)
    batch = request.getfixturevalue("batch" if which == "minilm" else "smollm2_batch")
    targets, task = MODELS[which]
    twin = copy.deepcopy(model)
    names = [n for n, _ in twin.named_modules() if n.rsplit(".", 1)[-1] in targets]
    quantize_model(twin, skip=names, keep=task_head(twin), **QUANT)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="loftq", task_type=task,
                             loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2))
    theirs = peft.get_peft_model(twin, config).eval()
    variants.inject_adapters(model, "qlora", targets, rank=8, alpha=16, init="loftq", loftq_iter=2, **QUANT)
    variants.mark_trainable(model)
    ours = variants.layers_of(model)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours.keys() == peft_layers.keys() and len(ours) == (12 if which == "minilm" else 4)
    gen = torch.Generator().manual_seed(0)
    for name, layer in ours.items():
        ref = peft_layers[name]
        assert torch.equal(layer.lora_A, ref.lora_A["default"].weight)
        assert torch.equal(layer.lora_B, ref.lora_B["default"].weight)
        assert torch.equal(dequantized_weight(layer.base), ref.get_base_layer().weight)
        with torch.no_grad():  # the same step away from the start in both
            step = 0.02 * torch.randn(layer.lora_B.shape, generator=gen)
            layer.lora_B.add_(step)
            ref.lora_B["default"].weight.add_(step)

    def close(got, expected):  # to 1e-5 of the largest value in fp32 (SmolLM2's gradients are large)
        assert_close_or_bf16(got, expected, 1e-5 * expected.abs().max().item(), 0.0, bf16)

    forward_backward_both(model, theirs, batch, bf16, close)
    for name, layer in ours.items():
        ref = peft_layers[name]
        close(layer.lora_A.grad, ref.lora_A["default"].weight.grad)
        close(layer.lora_B.grad, ref.lora_B["default"].weight.grad)
    assert_merged_as_peft(model, theirs, ours, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("iterations", [1, 2])
def test_the_contract_base_start_exact_reload_and_merge(minilm, batch, tmp_path, iterations):
    """What tests/test_contract.py checks of every adapter, for the LoftQ start (rank 4, α = 4: s = 1).
    Inactive, the layers are their quantized base Q_T; active, each starts at Q_T + s·B·A, nearer its
    fp32 layer than QLoRA's start q(W0) (the logits need not be: every other linear is quantized
    too, with no adapter to make up for it); an adapter file rebuilds the trained model exactly on a
    fresh fp32 base (the injection re-runs the deterministic LoftQ, so the base is the same Q_T: also
    at T = 2, where Q_T depends on an SVD); merge and unmerge keep the function."""
    model, _ = minilm
    fp32 = copy.deepcopy(model)
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=4, alpha=4, exclude=["classifier"],
                             init="loftq", loftq_iter=iterations)
    layers = variants.layers_of(model).values()
    with torch.no_grad():
        start = model(**batch).logits
        for layer in layers:
            layer.active = False
        own_base = model(**batch).logits
        for layer in layers:
            layer.active = True
        assert not torch.allclose(start, own_base, atol=1e-4)
        x = torch.randn(16, 384, generator=torch.Generator().manual_seed(1))
        for name, layer in variants.layers_of(model).items():  # each adapted layer nearer its fp32 self
            exact = fp32.get_submodule(name)(x)
            qlora = QLoRALinear(copy.deepcopy(fp32.get_submodule(name)), rank=4, alpha=4)
            assert (layer(x) - exact).norm() < (qlora(x) - exact).norm()

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            for p in layer.adapter_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        trained = model(**batch).logits
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    fresh = copy.deepcopy(fp32)
    assert variants.load_adapter(fresh, path)["variant_kwargs"]["init"] == "loftq"
    for name, layer in variants.layers_of(fresh).items():
        assert torch.equal(dequantized_weight(layer.base), dequantized_weight(variants.layers_of(model)[name].base))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, trained)
        variants.merge_adapters(model)
        torch.testing.assert_close(model(**batch).logits, trained, atol=1e-4, rtol=1e-4)
        variants.unmerge_adapters(model)
        assert torch.equal(model(**batch).logits, trained)  # unmerge puts the quantized base back


def test_report_gives_the_errors_per_layer_and_their_mean(minilm):
    model, _ = minilm
    plain = copy.deepcopy(model)
    variants.inject_adapters(model, "qlora", ["query", "value"], rank=8, alpha=16, exclude=["classifier"],
                             init="loftq")
    report = variants.variant_of(model).report(model)
    loftq = report["loftq"]
    assert loftq["iterations"] == 1 and loftq["scaling"] == 2.0 and loftq["divide_scaling"] is False
    per_layer = loftq["relative_error_per_layer"]
    assert sorted(per_layer) == sorted(variants.layers_of(model))
    for key in ("quantized", "fit", "start"):
        assert loftq["relative_error"][key] == pytest.approx(sum(e[key] for e in per_layer.values()) / 12)
    # T = 1 and s = 2 with peft's undivided factors: (1 − s)² = 1, the start is as far as q(W0)
    assert loftq["relative_error"]["start"] == pytest.approx(loftq["relative_error"]["quantized"], rel=1e-3)
    assert loftq["relative_error"]["fit"] < 0.97 * loftq["relative_error"]["quantized"]
    assert report["quantization"]["quantized_linears"] == 37
    variants.inject_adapters(plain, "qlora", ["query"], rank=4, alpha=8)
    assert "loftq" not in variants.variant_of(plain).report(plain)


@pytest.mark.parametrize("settings, message", [
    ({"init": "loftq", "quant_type": "int8"},
     "variant.init='loftq' needs a 4-bit base: variant.quant_type must be nf4 or fp4, not 'int8'"),
    ({"init": "loftq", "loftq_iter": 0}, "variant.loftq_iter=0 must be an integer >= 1"),
    ({"init": "pissa"}, "variant.init='pissa' is not supported; allowed: kaiming, gaussian, loftq"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(variants.ConfigError, match=message) as failure:
        variants.get_variant("qlora").create(rank=4, alpha=8, **settings)
    assert "\n" not in str(failure.value)


def test_no_peft_format_export(minilm, tmp_path):
    """As QLoRA's: A and B belong to the 4-bit base Q_T, not to W0 (export the merged model)."""
    from variants.interop.peft_format import save_peft_adapter

    model, _ = minilm
    variants.inject_adapters(model, "qlora", ["query"], rank=4, alpha=4, exclude=["classifier"], init="loftq")
    with pytest.raises(variants.ConfigError, match="were trained on the 4-bit base"):
        save_peft_adapter(model, tmp_path, "classification")
