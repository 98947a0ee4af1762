"""What a run changed in the pretrained weights: intruder dimensions, the spectrum of ΔW and its
alignment with full fine-tuning's (analysis/weights.py, intruders.py, spectrum.py, alignment.py),
on matrices whose answer is known by hand and on adapter files written as runs write them."""

import csv
import json
import math

import pytest
import torch

import variants
from analysis import alignment, intruders, spectrum
from analysis.weights import weight_changes

Q0, V0 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"


def separated(d: int, generator: torch.Generator) -> torch.Tensor:
    """A d × d matrix with well-separated singular values 10·0.8^i, so a small change keeps its vectors."""
    u = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64)).Q
    return u @ torch.diag(10 * 0.8 ** torch.arange(d, dtype=torch.float64)) @ v.t()


def unit(d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, generator=generator, dtype=torch.float64)
    return x / x.norm()


def test_an_update_along_w0s_own_top_direction_adds_no_intruder():
    g = torch.Generator().manual_seed(0)
    w0 = separated(48, g)
    u, s, vh = torch.linalg.svd(w0)
    similarity = intruders.max_similarity(w0, w0 + 3 * s[0] * torch.outer(u[:, 0], vh[0]), k=10)
    assert intruders.intruder_positions(similarity, 0.5) == []
    assert similarity.min() > 0.99


def test_a_large_update_along_a_random_direction_adds_one_intruder_at_the_top():
    g = torch.Generator().manual_seed(1)
    w0 = separated(48, g)
    x, y = unit(48, g), unit(48, g)
    similarity = intruders.max_similarity(w0, w0 + 30 * torch.outer(x, y), k=10)
    assert intruders.intruder_positions(similarity, 0.5) == [1]  # the new top direction is x
    assert similarity[0] < 0.5 < similarity[1:].min()


def test_effective_rank_and_energy_rank_on_known_spectra():
    g = torch.Generator().manual_seed(2)
    rank_one = torch.linalg.svdvals(5 * torch.outer(unit(32, g), unit(24, g)))
    assert spectrum.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-9)
    assert spectrum.energy_rank(rank_one) == 1
    flat = torch.linalg.svdvals(3 * torch.eye(10, dtype=torch.float64))
    assert spectrum.effective_rank(flat) == pytest.approx(10.0)
    assert spectrum.energy_rank(flat) == 9  # 9 of 10 equal values hold exactly 90%
    assert spectrum.energy_rank(torch.tensor([4.0, 3.0])) == 2  # 16/25 < 0.9
    assert spectrum.effective_rank(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    # σ normalised by its sum (Roy & Vetterli), not σ²: p = (2/3, 1/3)
    assert spectrum.effective_rank(torch.tensor([2.0, 1.0], dtype=torch.float64)) == pytest.approx(
        math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)))
    assert spectrum.energy_rank(torch.tensor([3.0, 1.0], dtype=torch.float64)) == 1  # 9 of 10 is 90%: energy is σ²


def test_alignment_is_one_for_full_finetunings_own_top_part_and_zero_orthogonal_to_it():
    g = torch.Generator().manual_seed(3)
    full = torch.randn(32, 24, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    left, right = alignment.top_frames(full, 4)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    assert alignment.measures(top, left, right, 4) == pytest.approx({"phi_left": 1.0, "phi_right": 1.0, "share": 1.0})
    other = u[:, 4:8] @ torch.diag(s[4:8]) @ vh[4:8]
    assert alignment.measures(other, left, right, 4) == pytest.approx(
        {"phi_left": 0.0, "phi_right": 0.0, "share": 0.0}, abs=1e-12)
    # full fine-tuning's column space, rows orthogonal to its: the share counts both sides
    mixed = u[:, :4] @ torch.diag(s[:4]) @ vh[4:8]
    assert alignment.measures(mixed, left, right, 4) == pytest.approx(
        {"phi_left": 1.0, "phi_right": 0.0, "share": 0.0}, abs=1e-12)


def save_run(model, run_dir, seed=0):
    run_dir.mkdir(parents=True)
    variants.save_adapter(model, run_dir / "adapter.safetensors", extra_metadata={"model": "minilm"})
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "task": "t", "seed": seed}))
    return run_dir


@pytest.fixture
def lora_and_full(_minilm, tmp_path):
    """A rank-4 LoRA run on layer 0's query and value, and a full fine-tuning run whose change of
    those two weights is exactly the LoRA's ΔW, plus, in layer 1's query, a large update along a
    random direction (an intruder) and, in its value, one along W0's top direction (none)."""
    import copy

    lora = copy.deepcopy(_minilm[0])
    variants.inject_adapters(lora, "lora", [Q0, V0], rank=4, alpha=8, exclude=["classifier"])
    with torch.no_grad():
        for layer in variants.layers_of(lora).values():
            layer.lora_B.normal_(std=0.05, generator=torch.Generator().manual_seed(4))
    deltas = {name: layer.delta_weight().detach() for name, layer in variants.layers_of(lora).items()}
    full = copy.deepcopy(_minilm[0])
    variants.inject_adapters(full, "full")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, delta in deltas.items():
            full.get_submodule(name).weight += delta
        q1 = full.get_submodule("bert.encoder.layer.1.attention.self.query").weight
        s1 = torch.linalg.svdvals(q1.double())[0]
        q1 += (3 * s1 * torch.outer(unit(q1.shape[0], g), unit(q1.shape[1], g))).float()
        v1 = full.get_submodule("bert.encoder.layer.1.attention.self.value").weight
        u, s, vh = torch.linalg.svd(v1.double())
        v1 += (2 * s[0] * torch.outer(u[:, 0], vh[0])).float()
    return save_run(lora, tmp_path / "lora"), save_run(full, tmp_path / "full"), deltas


def test_the_change_read_from_a_run_dir_is_the_layers_delta_weight(lora_and_full):
    lora_run, full_run, deltas = lora_and_full
    changes = weight_changes(lora_run)
    assert sorted(changes) == sorted(deltas)  # the adapted layers only; the head is left out
    for name, (before, after) in changes.items():
        torch.testing.assert_close(after - before, deltas[name].double(), atol=1e-6, rtol=0)
    assert sorted(weight_changes(full_run)) == sorted([*deltas, "bert.encoder.layer.1.attention.self.query",
                                                       "bert.encoder.layer.1.attention.self.value"])


def test_scripts_on_run_dirs(lora_and_full, tmp_path, capsys):
    lora_run, full_run, _ = lora_and_full
    assert intruders.main([str(lora_run), str(full_run), "--out", str(tmp_path / "i")]) == 0
    with (tmp_path / "i" / "intruders.csv").open() as f:
        found = {(row["run"], row["module"]): row["positions"] for row in csv.DictReader(f)}
    assert found[("full", "bert.encoder.layer.1.attention.self.query")] == "1"
    assert found[("full", "bert.encoder.layer.1.attention.self.value")] == ""
    assert (tmp_path / "i" / "intruders.png").is_file() and (tmp_path / "i" / "intruders_epsilon.csv").is_file()

    assert spectrum.main([str(lora_run), str(full_run), "--out", str(tmp_path / "s")]) == 0
    with (tmp_path / "s" / "spectrum.csv").open() as f:
        rows = list(csv.DictReader(f))
    lora_rows = [row for row in rows if row["run"] == "lora"]
    assert len(lora_rows) == 2 and all(float(row["erank"]) <= 4 + 1e-6 and int(row["rank90"]) <= 4 for row in lora_rows)
    assert {row["rank90"] for row in rows if row["module"].startswith("bert.encoder.layer.1.")} == {"1"}

    assert alignment.main(["--full", str(full_run), "--runs", str(lora_run), "--out", str(tmp_path / "a")]) == 0
    with (tmp_path / "a" / "alignment.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # layer 0's query and value: the layers both changed
    for row in rows:
        assert float(row["share"]) == pytest.approx(1.0, abs=1e-6)
        assert float(row["phi_right"]) == pytest.approx(1.0, abs=1e-6)
        assert float(row["share_random"]) < 0.05
    assert "| lora | lora | 4 | full | 2 | 1.000" in capsys.readouterr().out


def test_a_run_without_its_full_finetuning_partner_is_one_clear_line(lora_and_full, tmp_path, capsys):
    lora_run, full_run, _ = lora_and_full
    (lora_run / "summary.json").write_text(json.dumps({"status": "completed", "task": "t", "seed": 7}))
    assert alignment.main(["--full", str(full_run), "--runs", str(lora_run), "--out", str(tmp_path / "a")]) == 2
    assert "no --full run of task 't' and seed 7" in capsys.readouterr().err


def test_a_quantized_base_is_compared_with_its_dequantized_weight(_minilm, tmp_path):
    """QLoRA trained on the NF4-rounded W0: that rounding is not what it learned, and its layers
    without an adapter (quantized too) did not change."""
    import copy

    model = copy.deepcopy(_minilm[0])
    variants.inject_adapters(model, "qlora", [Q0], rank=4, alpha=8, exclude=["classifier"])
    layer = variants.layers_of(model)[Q0]
    with torch.no_grad():
        layer.lora_B.normal_(std=0.05, generator=torch.Generator().manual_seed(6))
    changes = weight_changes(save_run(model, tmp_path / "qlora"))
    assert list(changes) == [Q0]
    before, after = changes[Q0]
    torch.testing.assert_close(before, layer.frozen_weight().double(), atol=0, rtol=0)
    torch.testing.assert_close(after - before, layer.delta_weight().detach().double(), atol=1e-6, rtol=0)
