"""The paper's analyses: subspace similarity φ (§7.2), amplification (§7.3)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import variants
from analysis import amplification, subspace_overlap
from analysis.subspace_overlap import Incompatible, compare, phi, singular_basis
from analysis.weights import run_labels


def basis(rows: torch.Tensor) -> torch.Tensor:
    return singular_basis(rows)


def test_phi_identical_subspaces_is_one():
    a = torch.randn(8, 64, dtype=torch.float64)
    grid = phi(basis(a), basis(a))
    assert torch.allclose(grid.diagonal(), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(grid[0], torch.ones(8, dtype=torch.float64))  # the top direction lies in every top-j span


def test_phi_nested_and_orthogonal_subspaces():
    eye = torch.eye(32, dtype=torch.float64)
    small = eye[:4] * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64).unsqueeze(1)  # e1..e4, ordered
    large = eye[:16] * torch.arange(16, 0, -1, dtype=torch.float64).unsqueeze(1)          # e1..e16, ordered
    grid = phi(basis(small), basis(large))
    assert torch.allclose(grid[:, 3:], torch.ones(4, 13, dtype=torch.float64))  # j ≥ 4 contains all of e1..e4
    assert grid[3, 0] == pytest.approx(1.0)                                    # min(i, j) = 1: e1 ⊂ span(e1..e4)
    assert grid[3, 1] == pytest.approx(1.0) and grid[3, 2] == pytest.approx(1.0)
    other = eye[16:24]
    assert torch.allclose(phi(basis(small), basis(other)), torch.zeros(4, 8, dtype=torch.float64))


def test_phi_random_baseline_is_ij_over_d():
    torch.manual_seed(0)
    d, trials = 256, 30
    total = torch.zeros(8, 64, dtype=torch.float64)
    for _ in range(trials):
        total += phi(basis(torch.randn(8, d, dtype=torch.float64)), basis(torch.randn(64, d, dtype=torch.float64)))
    mean = total / trials
    i = torch.arange(1, 9, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(1, 65, dtype=torch.float64).unsqueeze(0)
    expected = i * j / d / torch.minimum(i, j)  # E‖U1ᵀU2‖² = i·j/d
    assert torch.allclose(mean, expected, atol=0.02, rtol=0.15)


def fake_run(folder, modules, rank, d=48, model="minilm", variant="lora", seed=0, shared=None):
    """A run dir with an adapter file like save_adapter writes (only what the analysis reads)."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        a = torch.randn(rank, d, generator=gen)
        if shared is not None:  # put a common top direction into every A
            a[0] = 100 * shared
        if variant == "adalora":
            tensors[f"{name}.lora_Q"] = a
            tensors[f"{name}.lora_P"] = torch.randn(d, rank, generator=gen)
            tensors[f"{name}.lora_E"] = torch.ones(rank)
            tensors[f"{name}.rank_mask"] = torch.arange(rank) < rank // 2
        else:
            tensors[f"{name}.lora_A"] = a
            tensors[f"{name}.lora_B"] = torch.randn(d, rank, generator=gen)
    meta = {"variant": variant, "rank": rank, "alpha": rank, "modules": modules, "model": model}
    save_file(tensors, str(folder / "adapter.safetensors"), metadata={"adapter_config": json.dumps(meta)})
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "seed": seed}))
    return folder


MODULES = ["enc.layer.0.query", "enc.layer.0.value"]


def test_compare_finds_a_shared_top_direction(tmp_path):
    shared = torch.nn.functional.normalize(torch.randn(48), dim=0)
    r8 = fake_run(tmp_path / "r8", MODULES, 8, shared=shared, seed=1)
    r32 = fake_run(tmp_path / "r32", MODULES, 32, shared=shared, seed=2)
    results = compare(r8, r32, random_baseline=True)
    assert list(results) == MODULES
    entry = results[MODULES[0]]
    assert (entry["r1"], entry["r2"], len(entry["phi"]), len(entry["phi"][0])) == (8, 32, 8, 32)
    assert entry["phi"][0][0] > 0.95          # the planted direction is the top one in both
    assert entry["phi_random"][0][0] < 0.3    # random matrices share nothing special


def test_adalora_uses_the_kept_rows_of_q(tmp_path):
    run = fake_run(tmp_path / "ada", MODULES, 8, variant="adalora")
    results = compare(run, run, side="down")
    assert results[MODULES[0]]["r1"] == 4  # half the triplets kept
    results = compare(run, run, side="up")
    assert results[MODULES[0]]["r1"] == 4


def test_incompatible_runs_are_clear_errors(tmp_path, capsys):
    a = fake_run(tmp_path / "a", MODULES, 4, seed=1)
    b = fake_run(tmp_path / "b", MODULES, 4, model="roberta-base", seed=2)
    c = fake_run(tmp_path / "c", ["other.query"], 4, seed=3)
    with pytest.raises(Incompatible, match="different models: 'minilm' vs 'roberta-base'"):
        compare(a, b)
    with pytest.raises(Incompatible, match="no module is adapted in both runs"):
        compare(a, c)
    assert subspace_overlap.main([str(a), str(tmp_path / "nothing")]) == 2
    assert "has no adapter.safetensors" in capsys.readouterr().err


def test_main_writes_numbers_and_heatmaps(tmp_path, capsys):
    a = fake_run(tmp_path / "a", MODULES, 4, seed=1)
    b = fake_run(tmp_path / "b", MODULES, 16, seed=2)
    out = tmp_path / "out"
    assert subspace_overlap.main([str(a), str(b), "--out", str(out), "--random-baseline", "--zoom", "4"]) == 0
    data = json.loads((out / "phi.json").read_text())
    assert data["side"] == "down" and len(data["modules"][MODULES[1]]["phi"]) == 4
    assert (out / "phi.csv").read_text().count("\n") == 1 + 2 * 4 * 16
    for png in ("subspace_overlap.png", "subspace_overlap_zoom.png", "subspace_overlap_random.png"):
        assert (out / png).stat().st_size > 5_000
    assert "| enc.layer.0.query | 4 | 16 |" in capsys.readouterr().out


def test_amplification_on_constructed_matrices():
    gen = torch.Generator().manual_seed(0)
    weight = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.1]))
    # ΔW along W's weakest direction (e4 e4ᵀ): UᵀWV = 0.1, ‖ΔW‖ = 2 → amplification 20.
    delta = torch.zeros(4, 4)
    delta[3, 3] = 2.0
    stats = amplification.module_stats(weight, delta, rank=1, generator=gen)
    assert stats["delta_norm"] == pytest.approx(2.0)
    assert stats["on_delta_dirs"] == pytest.approx(0.1)
    assert stats["on_w_dirs"] == pytest.approx(10.0)
    assert stats["amplification"] == pytest.approx(20.0)
    assert 0 <= stats["on_random_dirs"] <= 10.0


@pytest.mark.parametrize("variant, settings", [("lora", {}), ("lora", {"scaling": "rslora"}), ("pissa", {}),
                                               ("milora", {})])
def test_amplification_of_a_real_adapter(minilm, tmp_path, capsys, variant, settings):
    """ΔW as the layer computes it: rsLoRA's α/√r, and PiSSA's and MiLoRA's change from their start."""
    import variants

    model, _ = minilm
    variants.inject_adapters(model, variant, ["query", "value"], rank=4, alpha=8, exclude=["classifier"], **settings)
    variants.mark_trainable(model, train_modules=["classifier"])
    with torch.no_grad():
        for layer in variants.layers_of(model).values():
            layer.lora_B.normal_(std=0.05)
    run = tmp_path / "run"
    run.mkdir()
    variants.save_adapter(model, run / "adapter.safetensors", extra_metadata={"model": "minilm"})
    assert amplification.main([str(run), "--modules", r"layer\.0\.", "--csv", str(tmp_path / "a.csv"),
                               "--plot", str(tmp_path / "a.png")]) == 0
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("run,bert.encoder.layer.0.attention.self.query,4,")
    layer = variants.layers_of(model)["bert.encoder.layer.0.attention.self.query"]
    delta_norm = float(rows[1].split(",")[3])
    assert delta_norm == pytest.approx(float(torch.linalg.matrix_norm(layer.delta_weight().detach())), rel=1e-5)


def test_amplification_says_dora_is_not_comparable(minilm, tmp_path, capsys):
    import variants

    model, _ = minilm
    variants.inject_adapters(model, "dora", ["query"], rank=4, alpha=8, exclude=["classifier"])
    run = tmp_path / "dora"
    run.mkdir()
    variants.save_adapter(model, run / "adapter.safetensors", extra_metadata={"model": "minilm"})
    assert amplification.main([str(run), "--modules", r"layer\.0\."]) == 0
    out = capsys.readouterr().out
    assert "note (dora): DoRA's dW = W' - W0 includes the magnitude rescaling" in out


def test_a_module_pruned_to_rank_zero_has_no_subspace(tmp_path, capsys):
    from safetensors.torch import load_file

    run = fake_run(tmp_path / "ada", MODULES, 8, variant="adalora")
    tensors = load_file(str(run / "adapter.safetensors"))
    tensors[f"{MODULES[0]}.rank_mask"] = torch.zeros(8, dtype=torch.bool)
    meta = {"variant": "adalora", "rank": 8, "alpha": 8, "modules": MODULES, "model": "minilm"}
    save_file(tensors, str(run / "adapter.safetensors"), metadata={"adapter_config": json.dumps(meta)})
    other = fake_run(tmp_path / "lora", MODULES, 8, seed=1)
    assert compare(run, other)[MODULES[0]]["phi"] == []
    assert subspace_overlap.main([str(run), str(other), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"| {MODULES[0]} | 0 | 8 | – | – |" in out
    # AdaLoRA's near-orthonormal Q has no meaningful direction order: the output says so, once.
    assert out.count("note (adalora): AdaLoRA keeps Q's rows near-orthonormal") == 1
    assert "adalora" in json.loads((tmp_path / "out" / "phi.json").read_text())["notes"]
    assert subspace_overlap.main([str(other), str(other), "--out", str(tmp_path / "out2")]) == 0
    assert "note (" not in capsys.readouterr().out  # LoRA's numbers need no note


def test_the_documented_pairing_starts_at_the_random_level_and_one_seed_nests_the_ranks(minilm):
    """Fig. 3 pairs rank 8 seed 0 with rank 64 seed 1: at step 0 their overlap is that of random
    subspaces (so a trained overlap above it was learned); with one seed rank 8 starts inside rank 64."""
    def start(rank, seed):
        model = copy.deepcopy(minilm[0])
        torch.manual_seed(seed)
        variants.inject_adapters(model, "lora", ["query", "value"], rank=rank, alpha=16)
        return variants.layers_of(model)["bert.encoder.layer.0.attention.self.query"].lora_A.detach().double()

    phi_start = phi(singular_basis(start(8, 0)), singular_basis(start(64, 1)))
    assert phi_start[:, -1].mean() < 1.3 * 64 / 384 and phi_start[0, 0] < 0.05  # random: j/d, ~1/d
    # One seed: rank 8's A is rank 64's first 8 rows (the same draws), which is why such pairs are refused.
    assert torch.equal(start(8, 0), start(64, 0)[:8])


def test_runs_of_one_seed_are_refused(tmp_path, capsys):
    a = fake_run(tmp_path / "a", MODULES, 8, seed=0)
    b = fake_run(tmp_path / "b", MODULES, 16, seed=0)
    assert subspace_overlap.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "both runs used seed=0: their adapters may start from the same random draws" in capsys.readouterr().err
    assert subspace_overlap.main([str(a), str(b), "--out", str(tmp_path / "out"), "--allow-shared-init"]) == 0
    (b / "summary.json").write_text(json.dumps({"status": "completed", "seed": 1}))
    assert subspace_overlap.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    for run in (a, b):  # warm-started from one file: the same start whatever the seeds
        (run / "summary.json").write_text(json.dumps({"status": "completed", "seed": int(run is b),
                                                      "init_from": "runs/mnli"}))
    assert subspace_overlap.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "both runs started from the adapters of runs/mnli" in capsys.readouterr().err
    (b / "summary.json").unlink()
    assert subspace_overlap.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    assert "has no summary.json with its seed" in capsys.readouterr().err


def offset_run(folder, start, seed, d=48, rank=4):
    """A PiSSA-like run dir: A and B started at ``start`` (A0, B0, shared by every seed, as W0's
    SVD is) and moved by a small random update of this seed's."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    a0, b0 = start
    tensors = {}
    for name in MODULES:
        tensors.update({f"{name}.lora_A0": a0.clone(), f"{name}.lora_B0": b0.clone(),
                        f"{name}.lora_A": a0 + 0.1 * torch.randn(rank, d, generator=gen),
                        f"{name}.lora_B": b0 + 0.1 * torch.randn(d, rank, generator=gen)})
    meta = {"variant": "pissa", "rank": rank, "alpha": rank, "modules": MODULES, "model": "minilm"}
    save_file(tensors, str(folder / "adapter.safetensors"), metadata={"adapter_config": json.dumps(meta)})
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "seed": seed}))
    return folder


def test_started_variants_compare_the_update_not_the_shared_start(tmp_path):
    """PiSSA's A starts at W0's top singular vectors whatever the seed: φ of A would be ~1 for two
    independent runs. The analyses read the update B·A − B₀·A₀ (rank 2r), whose factors multiply
    back to it, ordered by singular value; two independent updates share nothing special."""
    gen = torch.Generator().manual_seed(7)
    start = (10 * torch.randn(4, 48, generator=gen), 10 * torch.randn(48, 4, generator=gen))
    run_1, run_2 = offset_run(tmp_path / "s1", start, seed=1), offset_run(tmp_path / "s2", start, seed=2)

    state = {k.split(".")[-1]: v for k, v in load_file(str(run_1 / "adapter.safetensors")).items()
             if k.startswith(MODULES[0] + ".")}
    down, up = variants.get_variant("pissa").low_rank_factors(state)
    update = state["lora_B"] @ state["lora_A"] - state["lora_B0"] @ state["lora_A0"]
    assert down.shape == (8, 48) and up.shape == (48, 8)  # rank 2r
    assert torch.allclose(up @ down, update, atol=1e-4)
    row_norms = down.norm(dim=1)
    assert torch.all(row_norms[:-1] >= row_norms[1:])  # √S·Vᵀ: the update's largest direction first

    entry = compare(run_1, run_2, random_baseline=True)[MODULES[0]]
    assert (entry["r1"], entry["r2"]) == (8, 8)
    assert entry["phi"][0][0] < 0.5  # A's own subspaces (the shared start) would give ~1
    assert compare(run_1, run_2, side="up")[MODULES[0]]["phi"][0][0] < 0.5


def test_amplification_labels_runs_of_one_name_by_their_sweep(tmp_path):
    runs = [tmp_path / "lora_stsb" / "r8_s0", tmp_path / "pissa_stsb" / "r8_s0", tmp_path / "pissa_stsb" / "r64_s0"]
    assert run_labels(runs) == ["lora_stsb/r8_s0", "pissa_stsb/r8_s0", "r64_s0"]


@pytest.mark.parametrize("variant", ["vera", "hira", "gralora"])
def test_variants_without_low_rank_factors_are_one_line_in_both_analyses(minilm, tmp_path, capsys, variant):
    """VeRA (A and B not saved), HiRA (ΔW = W0 ⊙ B·A, full rank) and GraLoRA (k × k blocks) give no
    rank-r factors: both analyses say so in one line and exit 2."""
    import variants

    model, _ = minilm
    variants.inject_adapters(model, variant, ["query", "value"], rank=4, alpha=8, exclude=["classifier"])
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        variants.save_adapter(model, run / "adapter.safetensors", extra_metadata={"model": "minilm"})
        runs.append(str(run))
    assert amplification.main(runs[:1]) == 2
    assert subspace_overlap.main(runs) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 2, err
    assert all(f"variant {variant!r} has no low-rank factors" in line for line in err), err
