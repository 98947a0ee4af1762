"""CorDA: the decomposition checked by hand on a layer whose answer is known (which input directions
each mode trains, and that KPM's frozen residual keeps the principal part on the context); the
covariance's numerics (each sample scaled by its |max|, padding left out, the mean over samples
and over processes, the damping); the start, outputs, gradients and merged weights against peft's
``preprocess_corda`` on MiniLM and SmolLM2, both modes, fp32 and bf16 autocast; the export to
peft's format; the knowledge sources; bad settings in one line. (Start as the base model,
merge/unmerge and exact reload on a fresh base: tests/test_contract.py.)"""

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers.close import assert_close_or_bf16, assert_merged_as_peft, forward_backward_both
from helpers.config import composed
from torch import nn

import variants
from training.data.synthetic import generate_smoke
from training.distributed import Context
from training.knowledge import knowledge_loader
from variants.methods import corda
from variants.methods.corda import SampleCovariance, context_factors, damped_inverse

R, ALPHA = 4, 8
GLUE = Path(__file__).resolve().parents[2] / "shared" / "glue"


def start(model, targets, batches, mode="ipm", rank=R, **settings):
    """``model`` with CorDA on ``targets``, started from ``batches`` (the training batches for ipm,
    the knowledge batches for kpm), all of them."""
    knowledge = {"knowledge": "texts"} if mode == "kpm" else {}
    variants.inject_adapters(model, "corda", targets, rank=rank, alpha=ALPHA, mode=mode, batches=len(batches),
                             **knowledge, **settings)
    data = variants.InitData(iter(batches), lambda m, b: None, knowledge=iter(batches))
    return variants.variant_of(model).initialize(model, data)


# ------------------------------------------------------------------ the decomposition by hand

@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_each_mode_trains_the_input_directions_the_context_uses_most_or_least(mode):
    """W0 = Q (orthogonal) and C = diag(c): W0·C' = Q·diag(c + λ), so component i is Q·eᵢ·eᵢᵀ, W0 on
    input coordinate i alone, ordered by cᵢ + λ. IPM starts the adapter at W0 on the r coordinates
    the inputs fill most; KPM at W0 on the r they fill least, and freezes the rest. (PiSSA cannot
    tell them apart: every singular value of Q is 1.)"""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    c = torch.tensor([0.5, 9.0, 2.0, 7.0, 0.1, 4.0])
    down, up, damp = context_factors(q, torch.diag(c), rank=2, scaling=ALPHA / 2, mode=mode)
    assert damp == 0.01
    used = [1, 3] if mode == "ipm" else [0, 4]  # the two largest / smallest c, in the order of the components
    mask = torch.zeros(6)
    mask[used] = 1.0
    torch.testing.assert_close(ALPHA / 2 * up @ down, q @ torch.diag(mask), atol=1e-6, rtol=0)
    shift = 0.01 * c.mean()  # λ·mean(diag C)
    root = ((c[used] + shift) / (ALPHA / 2)).sqrt()  # A₀ = √(S/s)·(Vᵀ·C'⁻¹): rows eᵢᵀ·√(S/s)/(cᵢ + λ·c̄), up to sign
    # float32 factors of size ~1: 1e-6 held on an AVX-512 CPU, an AVX2 one's kernels land 10 ulps off
    torch.testing.assert_close(down.abs(), torch.eye(6)[used] * (root / (c[used] + shift))[:, None], atol=5e-6, rtol=0)
    torch.testing.assert_close(up.abs(), (q[:, used] * root).abs(), atol=5e-6, rtol=0)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_kpm_freezes_the_principal_part_on_the_context_and_ipm_trains_it(mode):
    """A random W0 ``(10, 8)`` and inputs that fill a few directions: the full decomposition is W0
    (U·S·Vᵀ·C'⁻¹), s·B₀·A₀ + W_res = W0, and on the context (times C') the adapter holds the mode's
    r components, the frozen residual the others: for KPM the d − r largest, so the update
    starts where the context's outputs are smallest."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(10, 8, generator=gen)
    x = torch.randn(200, 8, generator=gen) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
    covariance = x.t() @ x / 200
    layer = nn.Sequential(nn.Linear(8, 10))
    with torch.no_grad():
        layer[0].weight.copy_(weight)
    variants.inject_adapters(layer, "corda", ["0"], rank=3, alpha=ALPHA, mode=mode,
                             **({"knowledge": "texts"} if mode == "kpm" else {}))
    adapter = layer[0]
    down, up, _ = context_factors(weight, covariance, 3, adapter.scaling, mode)
    adapter.start_from(down, up)
    damped, inverse, _ = damped_inverse(covariance)
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    torch.testing.assert_close(u @ torch.diag(s) @ vh @ inverse, weight, atol=1e-4, rtol=0)  # (3)
    start, residual = adapter.scaling * adapter.lora_B0 @ adapter.lora_A0, adapter.initial_weight()
    torch.testing.assert_close(start + residual, weight, atol=1e-6, rtol=0)
    trained, frozen = (s[:3], s[3:]) if mode == "ipm" else (s[5:], s[:5])
    torch.testing.assert_close(torch.linalg.svdvals(start @ damped)[:3], trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.linalg.svdvals(residual @ damped)[:5], frozen, atol=1e-4, rtol=1e-4)
    on_context = (x @ start.t()).norm() / (x @ weight.t()).norm()
    assert on_context < 0.05 if mode == "kpm" else on_context > 0.95


def test_the_damping_doubles_until_the_inverse_is_within_tolerance(monkeypatch):
    """C' = C + λ·mean(diag C)·I from λ = 0.01, doubled until ‖C'·C'⁻¹ − I‖_F < tolerance (0.05 in
    the authors' code; lowered here so that 0.01 does not reach it on a rank-1 C)."""
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    covariance = torch.outer(v, v)
    damped, inverse, damp = damped_inverse(covariance)
    assert damp == 0.01 and torch.equal(damped, covariance + torch.eye(64) * (covariance.diagonal().mean() * 0.01))
    eye = torch.eye(64)
    first_error = float(torch.dist(damped @ inverse, eye))
    monkeypatch.setattr(corda, "INVERSE_ERROR", first_error / 4)
    damped, inverse, damp = damped_inverse(covariance)
    assert damp in (0.02, 0.04, 0.08, 0.16, 0.32, 0.64) and torch.dist(damped @ inverse, eye) < first_error / 4
    with pytest.raises(ValueError, match="saw no input"):
        damped_inverse(torch.zeros(4, 4))


# ------------------------------------------------------------------ the covariance

def test_each_sample_is_scaled_by_its_max_and_padding_is_left_out():
    """Two samples in one padded batch: C = mean over samples of (Xᵢ/|max Xᵢ|)ᵀ·(Xᵢ/|max Xᵢ|), the
    max taken over the sample's real tokens (signed, then |·|: a sample whose inputs are all
    negative is divided by its least negative one, as in the authors' code)."""
    gen = torch.Generator().manual_seed(3)
    first, second = torch.randn(5, 4, generator=gen), -torch.rand(3, 4, generator=gen) - 0.5
    x = torch.full((2, 5, 4), 100.0)  # the padding's inputs: large, and never counted
    x[0], x[1, :3] = first, second
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    sums = SampleCovariance(4, torch.float32, torch.device("cpu"))
    sums.add(x, keep)
    expected = sum((s / s.max().abs()).t() @ (s / s.max().abs()) for s in (first, second)) / 2
    torch.testing.assert_close(sums.covariance(lambda t: t), expected, atol=1e-6, rtol=1e-6)
    assert sums.count == 2


def test_the_covariance_is_the_mean_over_the_samples_of_every_process():
    """A data-parallel run's processes each sum their share; the mean over processes of the sums
    over the mean of the counts is the covariance of all samples (as one process would get)."""
    gen = torch.Generator().manual_seed(4)
    x, keep = torch.randn(6, 7, 3, generator=gen), torch.rand(6, 7, generator=gen) > 0.3
    keep[:, 0] = True
    whole = SampleCovariance(3, torch.float64, torch.device("cpu"))
    whole.add(x, keep)
    halves = [SampleCovariance(3, torch.float64, torch.device("cpu")) for _ in range(2)]
    halves[0].add(x[:2], keep[:2])
    halves[1].add(x[2:], keep[2:])  # uneven shares: 2 and 4 samples
    partner = {id(halves[0].total): halves[1].total, id(halves[0].count): halves[1].count}
    torch.testing.assert_close(halves[0].covariance(lambda t: (t + partner[id(t)]) / 2), whole.covariance(lambda t: t))


def test_a_padded_batch_gives_the_covariance_of_its_samples_fed_alone(minilm):
    """What ``initialize`` sums over a padded batch is what the authors' code sums feeding each
    sample alone, unpadded (to float rounding: padding changes the matmuls' shapes)."""
    model, tokenizer = minilm
    texts = [ex["sentence"] for ex in generate_smoke(8, 1)[0]]
    singles = [dict(tokenizer(t, return_tensors="pt")) for t in texts]
    padded = [dict(tokenizer(texts, padding=True, return_tensors="pt"))]
    assert padded[0]["attention_mask"].float().mean() < 0.9  # there is padding to leave out
    covariances = []
    for batches in (singles, padded):
        ours = copy.deepcopy(model)
        variants.inject_adapters(ours, "corda", ["query", "value"], rank=R, alpha=ALPHA, batches=len(batches))
        layers = variants.layers_of(ours)
        sums, seen = variants.variant_of(ours)._estimate(ours, layers, iter(batches))
        assert seen == len(batches) and all(s.count == 8 for s in sums.values())
        covariances.append({n: s.covariance(lambda t: t) for n, s in sums.items()})
    for name, expected in covariances[0].items():
        torch.testing.assert_close(covariances[1][name], expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


def test_initialize_reads_its_batches_and_reports(minilm, batch):
    """``batches`` training batches (IPM) or knowledge batches (KPM), fewer where they end; the
    training batches untouched in KPM; every .grad and the train mode as they were."""
    model, _ = minilm
    variants.inject_adapters(model, "corda", ["query", "value"], rank=R, alpha=ALPHA, mode="kpm", knowledge="t",
                             batches=5)
    model.train()
    training = iter([dict(batch)] * 3)
    report = variants.variant_of(model).initialize(
        model, variants.InitData(training, lambda m, b: None, knowledge=iter([dict(batch)] * 3)))
    assert report == {"mode": "kpm", "knowledge": "t", "batches": 3, "samples_per_process": 6.0, "damping_raised": {}}
    assert len(list(training)) == 3 and model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="needs InitData.knowledge"):
        variants.variant_of(model).initialize(model, variants.InitData(iter([dict(batch)]), lambda m, b: None))


# ------------------------------------------------------------------ against peft

peft = pytest.importorskip("peft")


def peft_corda():
    """peft's ``preprocess_corda`` and ``CordaConfig`` (its corda module needs the attrs package,
    which peft does not declare; the test extras install it)."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda, CordaConfig


MODELS = {  # fixture, its batch fixture, targets, peft task type, samples (enough tokens to fill d_in)
    "minilm": ("minilm", "batch", ["query", "value"], "SEQ_CLS", 40),
    "smollm2": ("smollm2", "smollm2_batch", ["q_proj", "v_proj"], "CAUSAL_LM", 56),
}
PAIRS: dict = {}


def started_pair(request, model_name, mode):
    """(ours, peft's) CorDA models started from the same samples, each fed alone (peft's hook takes
    one unpadded sample per forward pass), and the measured start differences; built once per
    model and mode."""
    if (model_name, mode) not in PAIRS:
        fixture, _, targets, task_type, samples = MODELS[model_name]
        model, tokenizer = request.getfixturevalue(fixture)
        texts = [ex["sentence"] for ex in generate_smoke(samples, 1)[0]]
        singles = [dict(tokenizer(t, return_tensors="pt")) for t in texts]
        preprocess_corda, CordaConfig = peft_corda()
        theirs = copy.deepcopy(model)
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="corda",
                                 corda_config=CordaConfig(corda_method=mode), task_type=task_type)
        with torch.no_grad():
            preprocess_corda(theirs, config, run_model=lambda: [theirs(**s) for s in singles])
        theirs = peft.get_peft_model(theirs, config)
        ours = copy.deepcopy(model)
        start(ours, targets, singles, mode)
        PAIRS[model_name, mode] = ours, theirs
    return (copy.deepcopy(m) for m in PAIRS[model_name, mode])


def peft_layers(theirs):
    return {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("model_name", ["minilm", "smollm2"])
def test_the_start_matches_peft(request, model_name, mode):
    """A, B and the frozen residual (ours: W0 − s·B₀·A₀, computed; peft's: the base weight it
    rewrote) from the same samples. The same float32 operations in the same order, so equal to the
    last bit (the inverse of C', of condition up to ~100·d_in, magnifies any difference in how a
    sum is ordered to ~1e-3 of A: one ulp in mean(diag C) did)."""
    ours, theirs = started_pair(request, model_name, mode)
    reference = peft_layers(theirs)
    layers = variants.layers_of(ours)
    assert layers.keys() == reference.keys() and len(layers) == (12 if model_name == "minilm" else 4)
    for name, layer in layers.items():
        ref = reference[name]
        a, b = ref.lora_A["default"].weight, ref.lora_B["default"].weight
        torch.testing.assert_close(layer.lora_A, a, atol=1e-5 * a.abs().max().item(), rtol=0)
        torch.testing.assert_close(layer.lora_B, b, atol=1e-5 * b.abs().max().item(), rtol=0)
        torch.testing.assert_close(layer.lora_A0, layer.lora_A, atol=0, rtol=0)
        weight = ref.get_base_layer().weight
        torch.testing.assert_close(layer.initial_weight(), weight, atol=1e-6 * weight.abs().max().item(), rtol=0)


def training_stand_in(ours, theirs):
    """The same change to A and B in both, as training would make."""
    gen = torch.Generator().manual_seed(5)
    reference = peft_layers(theirs)
    with torch.no_grad():
        for name, layer in variants.layers_of(ours).items():
            for mine, their in ((layer.lora_A, reference[name].lora_A["default"].weight),
                                (layer.lora_B, reference[name].lora_B["default"].weight)):
                step = 0.05 * mine.abs().max() * torch.randn(mine.shape, generator=gen)
                mine.add_(step)
                their.add_(step)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
@pytest.mark.parametrize("model_name", ["minilm", "smollm2"])
def test_outputs_gradients_and_merged_weights_match_peft(request, model_name, mode, bf16):
    """After the same change to A and B: ours computes W0·x + s·(B·A − B₀·A₀)·x, peft W_res·x +
    s·B·A·x; the same outputs, A's and B's gradients, and merged weights. fp32, and under CPU
    bf16 autocast to a few bf16 steps of the largest value."""
    ours, theirs = started_pair(request, model_name, mode)
    batch = request.getfixturevalue(MODELS[model_name][1])
    variants.mark_trainable(ours)
    training_stand_in(ours, theirs)
    ours.eval()
    theirs.eval()
    forward_backward_both(ours, theirs, batch, bf16, lambda got, expected: assert_close_or_bf16(got, expected, atol=1e-4, rtol=1e-4, bf16=bf16))
    reference = peft_layers(theirs)
    for name, layer in variants.layers_of(ours).items():
        for mine, their in ((layer.lora_A, reference[name].lora_A["default"].weight),
                            (layer.lora_B, reference[name].lora_B["default"].weight)):
            assert_close_or_bf16(mine.grad, their.grad, atol=1e-4 * their.grad.abs().max().item(), rtol=1e-4,
                                 bf16=bf16)
    assert_merged_as_peft(ours, theirs, variants.layers_of(ours), atol=1e-5, rtol=1e-5)


def test_peft_loads_the_exported_adapter(minilm, batch, tmp_path):
    """peft has CorDA as an initialisation only: a trained CorDA layer is exported, as PiSSA's, as
    the rank-2r LoRA of its update on the unmodified W0 ([A; A₀], [B, −B₀])."""
    from peft import PeftModel

    from variants.interop.peft_format import save_peft_adapter

    model, tokenizer = minilm
    fresh = copy.deepcopy(model)
    texts = [ex["sentence"] for ex in generate_smoke(16, 1)[0]]
    start(model, ["query", "value"], [dict(tokenizer(texts, padding=True, return_tensors="pt"))])
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            layer.lora_B.add_(0.05)
    config = save_peft_adapter(model, tmp_path, "classification", trained=["classifier.weight", "classifier.bias"])
    assert config["r"] == 2 * R
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ settings and knowledge sources

@pytest.mark.parametrize("settings, message", [
    ({"mode": "pca"}, "variant.mode='pca' is not supported; allowed: ipm, kpm"),
    ({"mode": "kpm"}, "variant.knowledge=None must name the knowledge texts with variant.mode=kpm; allowed: probe"),
    ({"knowledge": "probe"}, "variant.knowledge='probe' is read only with variant.mode=kpm .*; allowed: null"),
    ({"batches": 0}, "variant.batches=0 must be an integer >= 1"),
    ({"precision": "float16"}, "variant.precision='float16' is not supported; allowed: float32, float64"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(variants.ConfigError, match=message) as refused:
        variants.get_variant("corda").create(rank=4, alpha=8, **settings)
    assert "\n" not in str(refused.value)


def test_float64_gives_the_float32_start_to_the_float32_inverse_s_precision(minilm):
    """The start's update s·B₀·A₀ from a float64 covariance, inverse and SVD: the float32 one to
    ~1e-3 of its largest entry (C'⁻¹, of condition up to ~100·d_in, amplifies float32 rounding;
    a bound of 3e-3 held on an AVX-512 CPU; an AVX2 one measured 3.1e-3)."""
    model, tokenizer = minilm
    texts = [ex["sentence"] for ex in generate_smoke(32, 1)[0]]
    batches = [dict(tokenizer(texts, padding=True, return_tensors="pt"))]
    starts = []
    for precision in ("float32", "float64"):
        ours = copy.deepcopy(model)
        start(ours, ["query"], batches, precision=precision)
        starts.append({n: layer.scaling * layer.lora_B0 @ layer.lora_A0 for n, layer in variants.layers_of(ours).items()})
    for name, update in starts[0].items():
        torch.testing.assert_close(update, starts[1][name], atol=5e-3 * update.abs().max().item(), rtol=0)


def knowledge_batches(*overrides, world=1, rank=0):
    """The batches ``knowledge_loader`` gives for ``python run.py variant=corda variant.mode=kpm <overrides>``
    (MiniLM's tokenizer), in process ``rank`` of ``world``."""
    from training.models import load_model

    cfg = composed("variant=corda", "variant.mode=kpm", *overrides)
    _, tokenizer = load_model(cfg.model.name_or_path, cfg.task.get("num_labels"))
    return list(knowledge_loader(cfg.variant.knowledge, cfg, tokenizer, Context(rank, world))), tokenizer


def test_a_text_file_is_one_text_per_line_in_training_batches(tmp_path):
    file = tmp_path / "facts.txt"
    file.write_text("\n".join(f"fact number {i} about the world." for i in range(40)) + "\n\n")
    batches, tokenizer = knowledge_batches(f"variant.knowledge={file}", "trainer.batch_size=16")
    assert [len(b["input_ids"]) for b in batches] == [16, 16, 8]
    texts = {tokenizer.decode(row[mask.bool()], skip_special_tokens=True) for b in batches
             for row, mask in zip(b["input_ids"], b["attention_mask"])}
    assert texts == {f"fact number {i} about the world." for i in range(40)}
    shard, _ = knowledge_batches(f"variant.knowledge={file}", "trainer.batch_size=16", world=2, rank=1)
    assert [len(b["input_ids"]) for b in shard] == [8, 8, 4]  # this process's half of every global batch


@pytest.mark.skipif(not (GLUE / "RTE" / "train.tsv").is_file(), reason="no GLUE data in ../shared/glue")
def test_a_glue_folder_gives_its_training_inputs_as_pairs():
    batches, _ = knowledge_batches(f"variant.knowledge={GLUE / 'RTE'}", "trainer.batch_size=500")
    assert sum(len(b["input_ids"]) for b in batches) == 2490  # RTE's training set
    assert (batches[0]["token_type_ids"] == 1).any()  # sentence pairs, as the task tokenizes them


def test_probe_is_the_forgetting_probe_s_texts(tmp_path):
    file = tmp_path / "probe.txt"
    file.write_text("\n".join(f"probe line {i}" for i in range(10)))
    batches, _ = knowledge_batches("variant.knowledge=probe", f"trainer.forgetting.file={file}",
                                   "trainer.forgetting.examples=6")
    assert sum(len(b["input_ids"]) for b in batches) == 6


@pytest.mark.parametrize("overrides, message", [
    (["variant.knowledge=probe"], "variant.knowledge=probe reads trainer.forgetting.file, which is not set"),
    (["variant.knowledge=/nowhere/x.txt"], "variant.knowledge='/nowhere/x.txt' is neither probe nor an existing"),
    (["variant.knowledge={jsonl}"], "is instruction data \\(JSONL\\), for causal LMs"),
    (["variant.knowledge={folder}"], "is not a GLUE task folder this project knows"),
])
def test_unreadable_knowledge_is_one_line(tmp_path, overrides, message):
    jsonl, folder = tmp_path / "k.jsonl", tmp_path / "NOTGLUE"
    jsonl.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    folder.mkdir()
    overrides = [o.format(jsonl=jsonl, folder=folder) for o in overrides]
    with pytest.raises(variants.ConfigError, match=message):
        knowledge_batches(*overrides)
