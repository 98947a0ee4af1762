"""Task data: the generated smoke task, GLUE-format folders, dynamic padding."""

import pytest
from helpers.config import task_config

from schema import ConfigError
from training.data import load_task, make_loader
from training.data import synthetic as smoke_task


def test_smoke_task_is_deterministic_balanced_and_disjoint():
    train, evaluation = smoke_task.generate_smoke(2000, 500)
    assert (train, evaluation) == smoke_task.generate_smoke(2000, 500)
    assert len(train) == 2000 and len(evaluation) == 500
    assert 0.45 < sum(e["label"] for e in train) / len(train) < 0.55
    assert not {e["sentence"] for e in train} & {e["sentence"] for e in evaluation}

    def adjectives(examples):
        words = {w.strip(".,") for e in examples for w in e["sentence"].split()}
        return words & set(smoke_task.POSITIVE + smoke_task.NEGATIVE)

    assert not adjectives(train) & adjectives(evaluation)


NEGATION_CUES = (" not ", " never ", " far from ", " anything but ", " nobody would claim ", " cannot say ")


def reference_label(sentence: str) -> int:
    """The documented rule, written independently of the generator."""
    text = sentence.rstrip(".")
    if text.startswith("although "):
        clause = text.split(", ", 1)[1]
    elif ", although " in text:
        clause = text.split(", although ")[0]
    else:
        clause = text.split(", but ")[-1]
    positive = clause.split()[-1] in smoke_task.POSITIVE
    negated = any(cue in f" {clause} " for cue in NEGATION_CUES)
    return int(positive != negated)


def test_smoke_task_labels_follow_the_rule():
    train, evaluation = smoke_task.generate_smoke(4000, 1000)
    for example in train + evaluation:
        assert example["label"] == reference_label(example["sentence"]), example
    forms = [", but ", "although ", ", although ", " far from ", "would not say"]
    assert all(any(f in e["sentence"] for e in train) for f in forms)


def sst2_task(data_dir):
    return task_config("sst2", data_dir=str(data_dir))


def write_sst2(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["sentence\tlabel"] + [f'a "quoted" film number {i} \'s fine\t{i % 2}' for i in range(n)]
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows[:3]) + "\n")
    return folder


def test_glue_folder(tmp_path):
    train, evaluations = load_task(sst2_task(write_sst2(tmp_path / "SST-2")))
    assert len(train) == 6 and list(evaluations) == ["main"] and len(evaluations["main"]) == 2
    assert train[1] == {"sentence": 'a "quoted" film number 1 \'s fine', "label": 1}


def test_glue_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="task.data_dir=.*is not a directory"):
        load_task(sst2_task(tmp_path / "missing"))
    folder = write_sst2(tmp_path / "SST-2")
    (folder / "dev.tsv").unlink()
    with pytest.raises(ConfigError, match="dev.tsv is missing"):
        load_task(sst2_task(folder))
    (folder / "dev.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(ConfigError, match=r"missing \['sentence'\]"):
        load_task(sst2_task(folder))


def test_glue_hub_offline_is_a_clear_error(tmp_path):
    task = sst2_task(tmp_path)
    task.data_dir = None
    with pytest.raises(ConfigError, match="could not load nyu-mll/glue/sst2.*task.data_dir="):
        load_task(task)


def test_batches_are_padded_to_their_own_length(minilm):
    _, tokenizer = minilm
    examples = [{"sentence": "short.", "label": 0}, {"sentence": "short too.", "label": 1},
                {"sentence": " ".join(["much longer"] * 20), "label": 1}, {"sentence": "tiny.", "label": 0}]
    lengths = [batch["input_ids"].shape[1] for batch in make_loader(examples, tokenizer, ["sentence"], 128, 2, shuffle=False)]
    assert lengths[0] < 8 < lengths[1]
