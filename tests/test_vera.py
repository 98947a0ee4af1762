"""VeRA: the update Λ_b·B·Λ_d·A by hand on small layers of two shapes (one shared A and B, sliced);
the start, outputs, gradients of d and b and merged weights against peft's ``VeraConfig`` on MiniLM's
and SmolLM2's layers, fp32 and bf16 autocast; the file (d, b and the seed, no A or B) rebuilding the
model on a fresh base; peft loading the export; the equal-budget count; bad settings in one line.
(Start as the base model, merge/unmerge and exact reload: tests/test_contract.py.)"""

import copy
import json

import pytest
import torch
from helpers.close import (
    assert_close_or_bf16,
    assert_dropout_draws_as_peft,
    assert_merged_as_peft,
    forward_backward_both,
)
from safetensors import safe_open
from torch import nn

import variants
from variants.methods.vera import random_projections


def two_shapes():
    """Layers of different shapes, (8 → 6) and (6 → 3): the shared pair is A (r, 8) and B (6, r)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))


def test_the_update_by_hand_with_one_shared_pair_sliced_per_layer():
    model = two_shapes()
    w0 = [model[0].weight.detach().clone(), model[1].weight.detach().clone()]
    x = torch.randn(5, 8)
    start = model(x)
    variants.inject_adapters(model, "vera", ["0", "1"], rank=4, alpha=1, projection_seed=5, d_initial=0.3)
    first, second = model[0], model[1]
    assert first.projections is second.projections  # one module, one A and one B in memory
    a, b = first.projections.A, first.projections.B
    expected_a, expected_b = random_projections(4, 8, 6, 5)
    assert torch.equal(a, expected_a) and torch.equal(b, expected_b) and a.shape == (4, 8) and b.shape == (6, 4)
    assert torch.equal(first.lambda_d, torch.full((4,), 0.3)) and not first.lambda_b.any()
    assert torch.equal(model(x), start)  # b = 0: the base model
    with torch.no_grad():
        for layer in (first, second):
            layer.lambda_d.normal_()
            layer.lambda_b.normal_()
    for layer, w, d_in, d_out in ((first, w0[0], 8, 6), (second, w0[1], 6, 3)):
        delta = torch.diag(layer.lambda_b) @ b[:d_out] @ torch.diag(layer.lambda_d) @ a[:, :d_in]  # Eq. 2
        torch.testing.assert_close(layer.delta_weight(), delta)
        h = torch.randn(5, d_in)
        torch.testing.assert_close(layer(h), h @ (w + delta).t() + layer.base.bias, atol=1e-6, rtol=1e-6)
    assert variants.count_parameters(model)[0] == (4 + 6) + (4 + 3)  # r + d_out per layer
    moved = copy.deepcopy(model).double()
    assert moved[0].projections is moved[1].projections and moved[1].projections.A.dtype == torch.float64


def test_the_projections_are_pinned_to_the_seed():
    """The first values torch's CPU generator gives for seed 0: a change in torch's generator would
    change the A and B every saved adapter is regenerated with, and must fail here first."""
    a, b = random_projections(4, 8, 6, 0)
    torch.testing.assert_close(a[0, :4], torch.tensor([-0.0064837765, 0.4645737708, -0.7127779722, -0.6373418570]))
    torch.testing.assert_close(b[-1], torch.tensor([0.4860794246, 0.1654542834, 0.8211747408, -0.7211326957]))
    assert a.abs().max() <= (6 / 8) ** 0.5 and b.abs().max() <= (6 / 4) ** 0.5  # U(±√(6/fan_in))


def test_a_rank_above_the_layers_widths_is_allowed():
    """The paper runs r = 1024 on RoBERTa-base (768 wide); here above MiniLM's 384."""
    model = two_shapes()
    variants.inject_adapters(model, "vera", ["0", "1"], rank=20, alpha=1)
    assert model[0].projections.A.shape == (20, 8) and model[1].delta_weight().shape == (3, 6)


def test_the_file_holds_the_vectors_and_the_seed_and_a_fresh_base_rebuilds_the_model(minilm, batch, tmp_path):
    model, _ = minilm
    base = copy.deepcopy(model)
    variants.inject_adapters(model, "vera", ["query", "value"], rank=64, alpha=16, projection_seed=7,
                             exclude=["classifier"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            layer.lambda_b.add_(0.05 * torch.randn(layer.lambda_b.shape, generator=gen))
        trained = model(**batch).logits
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        metadata = json.loads(f.metadata()["adapter_config"])
    name = "bert.encoder.layer.0.attention.self.query"
    assert {k for k in keys if k.startswith(name + ".")} == {f"{name}.{t}" for t in
                                                            ("lambda_d", "lambda_b", "projection_seed")}
    assert len(keys) == 36 and metadata["variant_kwargs"]["projection_seed"] == 7
    fresh = copy.deepcopy(base)
    variants.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, trained)

    other = copy.deepcopy(base)  # projections of another seed: its vectors would scale other matrices
    variants.inject_adapters(other, "vera", ["query", "value"], rank=64, alpha=16, projection_seed=8)
    with pytest.raises(variants.ConfigError, match=r"projection_seed is 7, this model's variant.projection_seed=8"):
        variants.load_adapter(other, path)
    with pytest.raises(variants.ConfigError, match=r"projection_seed is 7"):
        variants.init_adapters_from(other, path)


def test_the_budget_counts_r_plus_d_out_and_r_has_no_ceiling(minilm):
    model, _ = minilm
    choice = variants.rank_for_budget(model, "vera", ["query", "value"], 100_000, ["classifier"])
    assert choice.rank == round((100_000 - 12 * 384) / 12) and choice.rank > 384  # above LoRA's ceiling
    variants.inject_adapters(model, "vera", ["query", "value"], alpha=16, exclude=["classifier"], **choice.settings)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == choice.method_params
    assert abs(choice.method_params - 100_000) <= 12 / 2


@pytest.mark.parametrize("settings, message", [
    ({"d_initial": 0.0}, r"variant.d_initial=0.0 must be a finite number > 0"),
    ({"projection_seed": -1}, r"variant.projection_seed=-1 must be an integer in \[0, 2\^63\)"),
    ({"dropout": 1.0}, r"variant.dropout=1.0 must be a finite number in \[0, 1\)"),
    ({"projection_prng_key": 0}, (r"variant.projection_prng_key is not a setting of variant='vera'; allowed: "
                                  r"dropout, d_initial, projection_seed")),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(variants.ConfigError, match=message):
        variants.get_variant("vera").create(rank=4, alpha=8, **settings)


peft = pytest.importorskip("peft")
# save_projection=False (as the export writes): peft warns that A and B come from the key
pytestmark = pytest.mark.filterwarnings("ignore:Specified to not save vera_A:UserWarning")

MODELS = {"minilm": (["query", "value"], "SEQ_CLS"), "smollm2": (["q_proj", "v_proj"], "CAUSAL_LM")}


def peft_vera(model, targets, task, rank, seed, **extra):
    config = peft.VeraConfig(r=rank, target_modules=targets, projection_prng_key=seed, save_projection=False,
                             task_type=task, **extra)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.vera.layer.VeraLayer)}
    return theirs, layers


def move_vectors(ours, theirs, seed=0):
    """The same random d and b in both (b ≠ 0, as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in ours.items():
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=gen))
            layer.lambda_b.copy_(0.1 * torch.randn(layer.lambda_b.shape, generator=gen))
            theirs[name].vera_lambda_d["default"].copy_(layer.lambda_d)
            theirs[name].vera_lambda_b["default"].copy_(layer.lambda_b)


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("bf16", [False, True])
def test_start_outputs_gradients_and_merge_match_peft_vera(request, which, bf16):
    """On identical weights, r = 256 and projection seed 3: A, B (SmolLM2: its W_q and W_v differ
    in shape, so W_v takes a slice of B), d and b at the start as peft's, bit for bit; then with
    the same random d and b, the outputs, d's and b's gradients and the merged weights; fp32, and
    under bf16 autocast to a few bf16 steps. (Measured: all equal bit for bit, except SmolLM2's
    gradients under bf16, within a bf16 step: the next test says why.)"""
    model, _ = request.getfixturevalue(which)
    batch = request.getfixturevalue("batch" if which == "minilm" else "smollm2_batch")
    targets, task = MODELS[which]
    theirs, peft_layers = peft_vera(model, targets, task, 256, 3)
    theirs.eval()
    variants.inject_adapters(model, "vera", targets, rank=256, alpha=16, projection_seed=3)
    variants.mark_trainable(model)
    ours = variants.layers_of(model)
    assert ours.keys() == peft_layers.keys() and len(ours) == (12 if which == "minilm" else 4)
    projections = next(iter(ours.values())).projections
    assert torch.equal(projections.A, theirs.base_model.vera_A["default"])
    assert torch.equal(projections.B, theirs.base_model.vera_B["default"])
    for name, layer in ours.items():
        assert torch.equal(layer.lambda_d, peft_layers[name].vera_lambda_d["default"])
        assert torch.equal(layer.lambda_b, peft_layers[name].vera_lambda_b["default"])
    move_vectors(ours, peft_layers)

    def close(got, expected):  # to 1e-6 of the largest value in fp32
        assert_close_or_bf16(got, expected, 1e-6 * expected.abs().max().item(), 0.0, bf16)

    forward_backward_both(model, theirs, batch, bf16, close)
    for name, layer in ours.items():
        close(layer.lambda_d.grad, peft_layers[name].vera_lambda_d["default"].grad)
        close(layer.lambda_b.grad, peft_layers[name].vera_lambda_b["default"].grad)
        assert projections.A.grad is None and projections.B.grad is None
    assert_merged_as_peft(model, theirs, ours, atol=1e-6, rtol=1e-6)


def test_under_autocast_the_layer_returns_its_bases_dtype_where_peft_returns_its_inputs(smollm2, smollm2_batch,
                                                                                         monkeypatch):
    """A deliberate difference: under bf16 autocast our layer returns what its base returns (bf16),
    as every adapter layer here, so that the wrapped model starts as its base there too; peft's VeRA
    casts its output back to the input's dtype (fp32 in SmolLM2's residual stream). The values are
    the same, but a tensor used twice downstream (q in SmolLM2's rotary embedding) then sums its two
    gradients in bf16 here and in fp32 in peft, so d's and b's gradients differ by a bf16 step. With
    our output cast to the input's dtype, the gradients are peft's bit for bit."""
    from variants.methods.vera import VeRALinear

    forward = VeRALinear.forward
    monkeypatch.setattr(VeRALinear, "forward", lambda self, x: forward(self, x).to(x.dtype))
    model, _ = smollm2
    theirs, peft_layers = peft_vera(model, ["q_proj", "v_proj"], "CAUSAL_LM", 256, 3)
    theirs.eval()
    variants.inject_adapters(model, "vera", ["q_proj", "v_proj"], rank=256, alpha=16, projection_seed=3)
    variants.mark_trainable(model)
    ours = variants.layers_of(model)
    move_vectors(ours, peft_layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_out, theirs_out = model(**smollm2_batch).logits, theirs(**smollm2_batch).logits
    assert torch.equal(ours_out, theirs_out)
    ours_out.float().sum().backward()
    theirs_out.float().sum().backward()
    for name, layer in ours.items():
        assert torch.equal(layer.lambda_d.grad, peft_layers[name].vera_lambda_d["default"].grad)
        assert torch.equal(layer.lambda_b.grad, peft_layers[name].vera_lambda_b["default"].grad)


def test_adapter_dropout_matches_peft_vera_dropout(minilm, batch):
    """In train mode with dropout 0.5 on the adapter path: the same masks (one per layer, drawn in
    the same order) give peft's outputs."""
    model, _ = minilm
    theirs, peft_layers = peft_vera(model, ["query", "value"], "SEQ_CLS", 32, 0, vera_dropout=0.5)
    variants.inject_adapters(model, "vera", ["query", "value"], rank=32, alpha=16, dropout=0.5)
    move_vectors(variants.layers_of(model), peft_layers)
    assert_dropout_draws_as_peft(model, theirs, batch, atol=1e-6, other_atol=1e-4)


@pytest.mark.parametrize("which", list(MODELS))
def test_peft_loads_the_export_and_gives_the_same_outputs(request, tmp_path, which):
    """save_peft_adapter writes a VeraConfig (save_projection false: peft regenerates A and B from
    projection_prng_key) with d, b and the trained head; PeftModel.from_pretrained on a fresh base
    gives the adapted model's outputs."""
    from variants.interop.peft_format import save_peft_adapter

    model, _ = request.getfixturevalue(which)
    batch = request.getfixturevalue("batch" if which == "minilm" else "smollm2_batch")
    targets = MODELS[which][0]
    fresh = copy.deepcopy(model)
    head = ["classifier"] if which == "minilm" else []
    variants.inject_adapters(model, "vera", targets, rank=128, alpha=16, projection_seed=11, exclude=head)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            layer.lambda_d.add_(0.05 * torch.randn(layer.lambda_d.shape, generator=gen))
            layer.lambda_b.add_(0.05 * torch.randn(layer.lambda_b.shape, generator=gen))
        if head:
            model.classifier.weight.add_(0.1)  # the trained head travels in modules_to_save
    trained = ["classifier.weight", "classifier.bias"] if head else []
    config = save_peft_adapter(model, tmp_path, "classification" if head else "causal_lm", trained=trained)
    assert config["peft_type"] == "VERA" and config["projection_prng_key"] == 11 and not config["save_projection"]
    assert config["r"] == 128 and config["modules_to_save"] == (head or None)
    with pytest.warns(UserWarning, match="PRNG"):
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)
