"""EVA: A starts at the principal components of each layer's (unpadded) inputs, by hand on
inputs of known covariance; ranks are redistributed by explained variance under the same total
budget with α scaled so α/r stays; estimation stops when the kept components stop moving; a
saved or checkpointed EVA model reloads with its own ranks. (Start as the base, merge/unmerge
and exact reload on MiniLM: tests/test_contract.py.)"""

import pytest
import torch
from torch import nn

import variants
from variants.methods.eva import redistribute

D = 12


class Tiny(nn.Module):
    """Two linear layers on (batch, seq, D) inputs, called the way the trainer calls a model."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(D, D), nn.Linear(D, 4)

    def forward(self, inputs, attention_mask=None):
        return self.second(torch.tanh(self.first(inputs)))


def batches(scales, count=6, padded=2, seed=0):
    """Inputs whose covariance is Q·diag(scales²)·Qᵀ (Q random orthogonal); the last ``padded``
    positions of every sequence are padding, filled with huge values the estimate must ignore."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen))
    out = []
    for _ in range(count):
        x = torch.randn(8, 10, D, generator=gen) * torch.as_tensor(scales) @ q.t()
        mask = torch.ones(8, 10, dtype=torch.long)
        mask[:, 10 - padded:] = 0
        x[:, 10 - padded:] = 1e4 * torch.randn(8, padded, D, generator=gen)
        out.append({"inputs": x, "attention_mask": mask})
    return out, q


def eva_model(rank=2, alpha=4, targets=("first",), **settings):
    torch.manual_seed(0)  # the same base weights every time
    model = Tiny()
    variants.inject_adapters(model, "eva", list(targets), rank=rank, alpha=alpha, **settings)
    return model


def initialize(model, data):
    method = variants.variant_of(model)  # as the trainer: no data-driven start over adapters loaded from a file
    return {} if method.started_from_file else method.initialize(model, variants.InitData(iter(data), lambda m, b: None))


def test_a_starts_at_the_principal_components_of_the_unpadded_inputs():
    scales = [5.0, 4.0, 3.0] + [0.5] * (D - 3)
    data, q = batches(scales)
    model = eva_model(rank=2, rho=1.0)
    report = initialize(model, data)
    layer = model.first
    assert layer.rank == 2 and not layer.lora_B.any()
    kept = torch.cat([b["inputs"][b["attention_mask"].bool()] for b in data[:report["batches"]]]).double()
    _, vectors = torch.linalg.eigh(torch.cov(kept.t()))
    expected = vectors[:, [-1, -2]].t().float()  # the two largest
    torch.testing.assert_close(layer.lora_A.abs(), expected.abs(), atol=1e-5, rtol=1e-4)
    # and they are (near) the true directions of the two largest scales
    assert (layer.lora_A @ q[:, :2]).abs().diagonal().min() > 0.95
    torch.manual_seed(0)
    base = Tiny()
    with torch.no_grad():
        assert torch.equal(model(data[0]["inputs"]), base(data[0]["inputs"]))  # B = 0: the base model


def test_tokens_labelled_minus_100_are_left_out_like_padding():
    """Per-token labels (a causal LM's): the positions labelled −100 hold huge values the estimate
    must ignore, as peft's use_label_mask; one label per sequence (classification) masks nothing."""
    scales = [5.0, 4.0, 3.0] + [0.5] * (D - 3)
    data, _ = batches(scales, count=30, padded=0)
    gen = torch.Generator().manual_seed(1)
    for b in data:
        b["labels"] = torch.ones(8, 10, dtype=torch.long)
        b["labels"][:, :3] = -100
        b["inputs"][:, :3] = 1e4 * torch.randn(8, 3, D, generator=gen)
    model = eva_model(rank=2, rho=1.0)
    report = initialize(model, data)
    kept = torch.cat([b["inputs"][:, 3:].reshape(-1, D) for b in data[:report["batches"]]]).double()
    expected = torch.linalg.eigh(torch.cov(kept.t()))[1][:, [-1, -2]].t().float()
    torch.testing.assert_close(model.first.lora_A.abs(), expected.abs(), atol=1e-5, rtol=1e-4)
    for b in data:
        b["labels"] = torch.ones(8, dtype=torch.long)
    classified = eva_model(rank=2, rho=1.0)
    initialize(classified, data)
    assert (classified.first.lora_A @ expected.t()).abs().diagonal().max() < 0.9  # the huge values dominate


def test_estimation_stops_when_the_kept_components_stop_moving():
    scales = [5.0, 4.0, 3.0] + [0.5] * (D - 3)
    same = [batches(scales, count=1)[0][0]] * 5  # the same batch again: the estimate cannot move
    report = initialize(eva_model(rank=2, rho=1.0), same)
    assert report["batches"] == 2 and report["not_converged"] == []
    report = initialize(eva_model(rank=2, rho=1.0, max_batches=1), batches(scales)[0])
    assert report["batches"] == 1 and report["not_converged"] == ["first"]


def test_redistribution_by_hand():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.4, 0.2, 0.15, 0.1]),
              "c": torch.tensor([0.01, 0.01, 0.0, 0.0])}
    # the 6 largest of the 12: a 0.5, b 0.4, a 0.3, b 0.2, b 0.15, then a 0.1 and b 0.1 tie: a first
    assert redistribute(ratios, 6) == {"a": 3, "b": 3, "c": 0}
    assert redistribute(ratios, 2) == {"a": 1, "b": 1, "c": 0}


def test_ranks_follow_explained_variance_with_alpha_scaled_to_keep_the_factor():
    """Two layers, budget 2 × 2: the first layer's inputs are concentrated in 3 directions, the
    second's (tanh of them) too, less so; every rank in [0, ρ·r] and the total is the budget."""
    data, _ = batches([10.0] + [0.01] * (D - 1))
    model = eva_model(targets=("first", "second"))
    report = initialize(model, data)
    ranks = report["ranks"]
    assert ranks["first"] != 2  # not r: α/r_l alone would not be α/r
    # by hand: each layer's explained-variance ratios from its own inputs (B = 0, so the second
    # layer sees tanh of the base first layer), the top ρ·r = 4 of each, the 4 largest of all 8
    kept = [b["inputs"][b["attention_mask"].bool()] for b in data[:report["batches"]]]
    with torch.no_grad():
        inputs = {"first": torch.cat(kept), "second": torch.tanh(model.first.base(torch.cat(kept)))}
    ratios = {}
    for name, x in inputs.items():
        variances = torch.linalg.eigvalsh(torch.cov(x.double().t())).flip(0)
        ratios[name] = (variances / variances.sum())[:4]
    largest = torch.cat(list(ratios.values())).argsort(descending=True)[:4]
    assert ranks == {"first": int((largest < 4).sum()), "second": int((largest >= 4).sum())}
    assert sum(ranks.values()) == 4 and ranks["first"] > 0
    for name, layer in variants.layers_of(model).items():
        assert layer.rank == ranks[name] and layer.lora_A.shape == (ranks[name], D)
        assert layer.alpha == pytest.approx(4 * ranks[name] / 2)
        if layer.rank:
            assert layer.scaling == pytest.approx(2.0)  # α·r_l/r over r_l: still α/r
    unscaled = eva_model(targets=("first", "second"), adjust_scaling=False)
    initialize(unscaled, data)
    assert unscaled.first.scaling == pytest.approx(4 / ranks["first"]) != 2.0


def test_a_saved_eva_adapter_and_a_checkpoint_state_bring_their_ranks(tmp_path):
    from training.checkpoint import load_model_state, model_state

    data, _ = batches([10.0] + [0.01] * (D - 1))  # the first layer's inputs near a line: rank 1 there
    model = eva_model(targets=("first", "second"))
    initialize(model, data)
    with torch.no_grad():
        model.first.lora_B.normal_()
    x = data[0]["inputs"]
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    torch.manual_seed(0)
    fresh = Tiny()  # the same base, no adapters
    variants.load_adapter(fresh, path)
    assert fresh.first.rank == model.first.rank != 2 and fresh.first.scaling == model.first.scaling
    assert torch.equal(fresh(x), model(x))

    resumed = eva_model(targets=("first", "second"))  # a resumed run: injected at rank 2, then the checkpoint
    load_model_state(resumed, model_state(model))
    assert resumed.first.rank == model.first.rank and torch.equal(resumed(x), model(x))


@pytest.mark.parametrize("settings, message", [
    ({"rho": 0.5}, r"variant.rho=0.5 must be a finite number >= 1"),
    ({"tau": 0}, r"variant.tau=0 must be a finite number in \(0, 1\]"),
    ({"max_batches": 0}, "variant.max_batches=0 must be an integer >= 1"),
])
def test_bad_settings(settings, message):
    with pytest.raises(variants.ConfigError, match=message):
        variants.get_variant("eva").create(rank=4, alpha=8, **settings)


peft = pytest.importorskip("peft")


@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_ranks_and_components_match_peft_eva_on_the_same_batches(minilm, scaling):
    """peft's EVA (``init_lora_weights="eva"``, its incremental PCA with a randomized SVD) on
    MiniLM's W_q and FFN input layers, against the exact PCA here, on the same batches of the smoke task: the same
    rank per layer, and each layer's A spanning the same subspace (its top directions nearly
    equal; the last ones within the two estimators' difference)."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    from training.data import make_loader
    from training.data.synthetic import generate_smoke as generate

    model, tokenizer = minilm
    train, _ = generate(320, 10)
    loader = make_loader(train, tokenizer, ["sentence"], 64, 16, shuffle=False)
    data = [{k: v for k, v in b.items() if k != "labels"} for b in loader]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "intermediate.dense"], init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=2.0, tau=0.99, use_label_mask=False), task_type="SEQ_CLS",
                             use_rslora=scaling == "rslora")
    import copy

    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    initialize_lora_eva_weights(theirs, data, show_progress_bar=False)
    variants.inject_adapters(model, "eva", ["query", "intermediate.dense"], rank=4, alpha=8, rho=2.0, tau=0.99,
                             scaling=scaling)
    report = variants.variant_of(model).initialize(model, variants.InitData(iter(data * 10), lambda m, b: None))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(set(report["ranks"].values())) > 1, report  # the ranks were redistributed
    for name, layer in variants.layers_of(model).items():
        a_theirs = peft_layers[name].lora_A["default"].weight.detach() if name in peft_layers else torch.zeros(0, 384)
        assert layer.rank == a_theirs.shape[0], (name, report["ranks"])
        if layer.rank:
            overlap = torch.linalg.svdvals(layer.lora_A.detach() @ a_theirs.t())  # cosines of the principal angles
            assert overlap.min() > 0.95, (name, overlap)
            assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"]), name  # α_l/r_l or α_l/√r_l


def test_a_layer_given_rank_0_is_its_base_layer_through_training_merge_and_reload(tmp_path):
    data, _ = batches([9.0, 8.0, 7.0] + [0.1] * (D - 3))
    model = eva_model(targets=("first", "second"))
    initialize(model, data)
    model.second.resize(0, 0.0)  # as redistribution leaves a layer whose components all lost
    variants.mark_trainable(model)
    x = data[0]["inputs"]
    with torch.no_grad():
        assert torch.equal(model.second(torch.tanh(model.first(x))), model.second.base(torch.tanh(model.first(x))))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).pow(2).mean().backward()
    optimizer.step()
    assert model.second.lora_A.shape == (0, D) and model.first.lora_B.abs().sum() > 0
    expected = model(x).detach()
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(model, path)
    torch.manual_seed(0)
    fresh = Tiny()
    variants.load_adapter(fresh, path)
    assert fresh.second.rank == 0 and torch.equal(fresh(x), expected)
    variants.merge_adapters(model)
    torch.testing.assert_close(model(x), expected)


def test_estimation_waits_for_the_kept_components_only():
    """ρ·r = 4 components, rank 2 kept: two strong, stable directions and an isotropic rest whose
    directions keep turning; the estimate stops once the two it keeps are stable."""
    data, _ = batches([20.0, 10.0] + [1.0] * (D - 2), count=30)
    report = initialize(eva_model(rank=2, rho=2.0, max_batches=30), data)
    assert report["ranks"] == {"first": 2} and report["not_converged"] == [] and report["batches"] < 10


def test_init_from_an_eva_run_takes_its_ranks_and_skips_the_data_driven_start(tmp_path):
    data, _ = batches([9.0, 8.0, 7.0] + [0.1] * (D - 3))
    source = eva_model(targets=("first", "second"))
    initialize(source, data)
    with torch.no_grad():
        source.first.lora_B.normal_()
    path = tmp_path / "adapter.safetensors"
    variants.save_adapter(source, path)
    warm = eva_model(targets=("first", "second"))
    variants.init_adapters_from(warm, path)
    assert initialize(warm, data) == {}  # not overwritten by a new start
    assert warm.first.rank == source.first.rank and torch.equal(warm.first.lora_B, source.first.lora_B)
