"""GLUE: every task's TSV layout as GLUE distributes it, label mapping, pairs, metrics."""

import re
from pathlib import Path

import numpy as np
import pytest
from helpers.config import task_config
from omegaconf import OmegaConf

from schema import ConfigError
from training.data import load_task, make_loader
from training.metrics import compute_metrics

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"

# Small files in each task's GLUE layout: (file name → lines), and what the loader must return.
LAYOUTS = {
    "cola": {
        "train.tsv": ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub."],
        "dev.tsv": ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks."],
    },
    "sst2": {
        "train.tsv": ["sentence\tlabel", "hide new secretions \t0", "a gorgeous film \t1"],
        "dev.tsv": ["sentence\tlabel", "it 's a charming journey . \t1"],
    },
    "mrpc": {
        "train.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused ."],
        "dev.tsv": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1\t2\tHe said no .\tShe said yes ."],
    },
    "qqp": {
        "train.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t1\t2\tHow do I learn?\tHow can I learn?\t1",
                      "2\t3\t4\tA broken line without the rest"],
        "dev.tsv": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "5\t6\t7\tWhy?\tWhy not?\t0"],
    },
    "stsb": {
        "train.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                      "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000"],
        "dev.tsv": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                    "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat.\tA man wearing a hat.\t3.800"],
    },
    "mnli": {
        "train.tsv": [("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                       "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"),
                      ("0\t31193\t31193n\tgovernment\t(\t(\t(\t(\tConceptually cream skimming has two dimensions.\t"
                       "Product and geography are what make cream skimming work.\tneutral\tneutral")],
        "dev_matched.tsv": [("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"),
                            ("0\t1\t1e\tfiction\t(\t(\t(\t(\tThe new rights are nice.\tEveryone likes the rights.\tneutral\t"
                             "entailment\tneutral\tneutral\tneutral\tneutral")],
        "dev_mismatched.tsv": [("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                                "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"),
                               ("0\t2\t2c\tletters\t(\t(\t(\t(\tYour gift is appreciated.\tNobody appreciates it.\t"
                                "contradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction")],
    },
    "qnli": {
        "train.tsv": ["index\tquestion\tsentence\tlabel", "0\tWhen?\tIn 1990.\tentailment"],
        "dev.tsv": ["index\tquestion\tsentence\tlabel", "0\tWho?\tThe weather is fine.\tnot_entailment"],
    },
    "rte": {
        "train.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tNo weapons were found.\tWeapons were found.\tnot_entailment"],
        "dev.tsv": ["index\tsentence1\tsentence2\tlabel", "0\tDana reads.\tDana reads books.\tentailment"],
    },
}

EXPECTED = {  # (first train example, {eval set: first example})
    "cola": ({"sentence": "Our friends won't buy this analysis.", "label": 1},
             {"main": {"sentence": "The sailors rode the breeze clear of the rocks.", "label": 1}}),
    "sst2": ({"sentence": "hide new secretions ", "label": 0}, {"main": {"sentence": "it 's a charming journey . ", "label": 1}}),
    "mrpc": ({"sentence1": "Amrozi accused his brother .", "sentence2": "Referring to him , Amrozi accused .", "label": 1},
             {"main": {"sentence1": "He said no .", "sentence2": "She said yes .", "label": 0}}),
    "qqp": ({"question1": "How do I learn?", "question2": "How can I learn?", "label": 1},
            {"main": {"question1": "Why?", "question2": "Why not?", "label": 0}}),
    "stsb": ({"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0},
             {"main": {"sentence1": "A man with a hard hat.", "sentence2": "A man wearing a hat.", "label": 3.8}}),
    "mnli": ({"premise": "Conceptually cream skimming has two dimensions.",
              "hypothesis": "Product and geography are what make cream skimming work.", "label": 1},
             {"main": {"premise": "The new rights are nice.", "hypothesis": "Everyone likes the rights.", "label": 1},
              "mismatched": {"premise": "Your gift is appreciated.", "hypothesis": "Nobody appreciates it.", "label": 2}}),
    "qnli": ({"question": "When?", "sentence": "In 1990.", "label": 0},
             {"main": {"question": "Who?", "sentence": "The weather is fine.", "label": 1}}),
    "rte": ({"sentence1": "No weapons were found.", "sentence2": "Weapons were found.", "label": 1},
            {"main": {"sentence1": "Dana reads.", "sentence2": "Dana reads books.", "label": 0}}),
}


def task_with_folder(name: str, folder: Path):
    return task_config(name, data_dir=str(folder))


def write_layout(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for file, lines in LAYOUTS[name].items():
        (folder / file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_glue_task_reads_its_tsv_layout(name, tmp_path):
    train, evaluations = load_task(task_with_folder(name, write_layout(name, tmp_path / name)))
    first_train, first_evals = EXPECTED[name]
    assert train[0] == first_train
    assert list(evaluations) == list(first_evals)  # main first
    for split, example in first_evals.items():
        assert evaluations[split][0] == example
    if name == "qqp":
        assert len(train) == 1  # the malformed line is skipped, as configured for QQP
    if name == "cola":
        assert len(train) == 2 and train[1]["label"] == 0  # headerless: the first line is data


def test_task_configs_match_the_paper_metrics():
    main = {n: task_config(n).main_metric for n in LAYOUTS}
    assert main == {"cola": "matthews", "sst2": "accuracy", "mrpc": "accuracy", "qqp": "accuracy",
                    "stsb": "pearson", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy"}
    assert task_config("stsb").num_labels == 1  # regression head
    assert task_config("mnli").num_labels == 3


def test_bad_rows_and_labels_are_clear_errors(tmp_path):
    folder = write_layout("rte", tmp_path / "RTE")
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ConfigError, match=r"dev.tsv line 2 has label 'maybe'; allowed: \['entailment', 'not_entailment'\]"):
        load_task(task_with_folder("rte", folder))
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tonly one field\n")
    with pytest.raises(ConfigError, match="line 2 has 2 columns, expected 4"):
        load_task(task_with_folder("rte", folder))


def test_pairs_are_tokenized_as_pairs(minilm, tmp_path):
    _, tokenizer = minilm
    train, _ = load_task(task_with_folder("rte", write_layout("rte", tmp_path / "RTE")))
    batch = next(iter(make_loader(train, tokenizer, ["sentence1", "sentence2"], 64, 4, shuffle=False)))
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tokenizer.sep_token_id) == 2  # [CLS] a [SEP] b [SEP]
    assert batch["token_type_ids"][0].max() == 1


def test_regression_labels_stay_float(minilm, tmp_path):
    _, tokenizer = minilm
    train, _ = load_task(task_with_folder("stsb", write_layout("stsb", tmp_path / "STS-B")))
    batch = next(iter(make_loader(train, tokenizer, ["sentence1", "sentence2"], 64, 4, shuffle=False)))
    assert batch["labels"].dtype.is_floating_point and batch["labels"].tolist() == [5.0]


def test_metrics_against_hand_computed_values():
    pred = np.array([1, 1, 0, 0, 1, 0])
    gold = np.array([1, 0, 0, 0, 1, 1])
    # TP = 2, FP = 1, TN = 2, FN = 1
    mcc = (2 * 2 - 1 * 1) / np.sqrt((2 + 1) * (2 + 1) * (2 + 1) * (2 + 1))
    got = compute_metrics(["accuracy", "f1", "matthews"], pred, gold)
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert got["matthews"] == pytest.approx(mcc)
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 5.0])
    # Pearson by hand: x̄ = 2.5, ȳ = 2.75; Σdx·dy = 5.5, Σdx² = 5, Σdy² = 8.75
    # Spearman: ranks of y = [1, 3, 2, 4]; Σd² = 2 → 1 − 6·2/(4·15) = 0.8
    got = compute_metrics(["pearson", "spearman"], x, y)
    assert got["pearson"] == pytest.approx(5.5 / np.sqrt(5 * 8.75))
    assert got["spearman"] == pytest.approx(0.8)


def test_paper_experiment_config_takes_each_tasks_hyperparameters():
    from hydra import compose, initialize_config_dir

    from training.experiment import variant_kwargs

    with initialize_config_dir(config_dir=str(CONF.parent), version_base=None):
        for task, (batch, epochs, lr) in {"rte": (32, 80, 5e-4), "mrpc": (16, 30, 4e-4), "stsb": (16, 40, 4e-4)}.items():
            cfg = compose("config", overrides=["+experiment=lora_paper_roberta_base", f"task={task}", "variant=dora"])
            trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
            assert (trainer["batch_size"], trainer["epochs"], trainer["lr"]) == (batch, epochs, lr)
            assert (trainer["warmup_ratio"], trainer["scheduler"], trainer["eval_every"]) == (0.06, "linear", "epoch")
            # alpha 16 and no adapter dropout, fp32, decay 0.1 on matrices: the official scripts
            assert (cfg.rank, cfg.alpha, cfg.model.name_or_path, cfg.model.max_length) == (8, 16, "roberta-base", 512)
            assert cfg.variant.name == "dora" and list(cfg.variant.targets) == ["query", "value"]
            assert cfg.variant.dropout == 0.0 and trainer["precision"] == "fp32"
            assert (trainer["weight_decay"], trainer["weight_decay_on"]) == (0.1, "matrices")
        # The same experiment for a baseline, which has no adapter dropout to set.
        cfg = compose("config", overrides=["+experiment=lora_paper_roberta_base", "task=rte", "variant=full"])
        assert "dropout" not in variant_kwargs(cfg.variant)


MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
TSV_FAULTS = {  # (task, file, its bytes, the line run.py must print)
    "class out of range in train": ("mrpc", "train.tsv", f"{MRPC_HEADER}\n1\t1\t2\ta .\tb .\n2\t3\t4\tc .\td .\n",
                                    "train.tsv line 3 has label '2'; allowed: integers 0 to 1"),
    "class out of range in dev": ("mrpc", "dev.tsv", f"{MRPC_HEADER}\n-1\t1\t2\ta .\tb .\n",
                                  "dev.tsv line 2 has label '-1'; allowed: integers 0 to 1"),
    "regression label not finite": ("stsb", "train.tsv", f"{STSB_HEADER}\n0\tg\tf\ty\t1\tn\tn\ta .\tb .\tnan\n",
                                    "train.tsv line 2 has label 'nan'; allowed: finite numbers"),
    "header only": ("mrpc", "train.tsv", f"{MRPC_HEADER}\n", "train.tsv' has no examples"),
    "not UTF-8": ("mrpc", "dev.tsv", f"{MRPC_HEADER}\n1\t1\t2\ta .\tb .\n".encode() + b"0\t3\t4\tcaf\xe9 .\td .\n",
                  "dev.tsv' line 3 is not UTF-8 (byte 0xe9); allowed: UTF-8 text"),
    "an extra column": ("mrpc", "train.tsv", f"{MRPC_HEADER}\n1\t1\t2\ta .\tb .\textra\n",
                        "train.tsv' line 2 has 6 columns, expected 5"),
    "an empty text": ("mrpc", "train.tsv", f"{MRPC_HEADER}\n1\t1\t2\t\tb .\n", "train.tsv' line 2 has an empty '#1 String'"),
}


def write_fault(tmp_path, fault):
    task, name, content, message = TSV_FAULTS[fault]
    folder = write_layout(task, tmp_path / task)
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return task, folder, message


@pytest.mark.parametrize("fault", sorted(TSV_FAULTS))
def test_a_bad_glue_file_is_found_at_load_time_naming_file_and_line(tmp_path, fault):
    task, folder, message = write_fault(tmp_path, fault)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_task(task_with_folder(task, folder))


@pytest.mark.parametrize("fault", ["class out of range in dev", "not UTF-8"])
def test_a_bad_glue_file_stops_run_py_before_training_in_one_line(tmp_path, fault):
    """Through run.py: exit 2, one line, before the first step (the dev file too, not after training)."""
    from test_run import run_py

    task, folder, message = write_fault(tmp_path, fault)
    run_dir = tmp_path / "run"
    result = run_py(f"task={task}", f"task.data_dir={folder}", "trainer.max_steps=2", "tracking.mode=disabled",
                    f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: task.data_dir: ") and message in last, last
    assert "Traceback" not in result.stderr and "train:" not in result.stderr  # before any step
