"""Export a finished run: a merged Hugging Face model folder, or the adapter in peft's format.

    python -m training.export RUN_DIR --merged OUT   # plain transformers: AutoModelFor*.from_pretrained(OUT)
    python -m training.export RUN_DIR --peft OUT     # peft.PeftModel.from_pretrained(base model, OUT)

The run's model is rebuilt from its ``adapter.safetensors`` on a fresh base (the one its metadata
names). ``--merged`` folds every adapter into its layer (QLoRA: the 4-bit weights dequantized,
then W0 + ΔW in fp32) and saves the plain model and its tokenizer: it reloads without this
project and generates what the adapted model generates. ``--peft`` writes the LoRA-family
adapters as ``variants/interop/peft_format.py`` describes. Bad input: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase

import variants
from schema import ConfigError
from variants.interop.peft_format import save_peft_adapter
from variants.methods.qlora import dequantize_model

from . import rundir
from .models import load_trained, loadable_path


def export_merged(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Merge the adapters into their layers (not reversible) and save model and tokenizer."""
    # 4-bit bases first become plain fp32 layers, so W0 + ΔW is formed and kept in fp32 (merging
    # onto the quantized layer would round it to the layer's compute dtype, bf16 on some machines)
    dequantize_model(model, dtype=torch.float32)
    variants.merge_and_unwrap(model)
    model.config.use_cache = True  # what a plain model is saved with; training turned it off
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def trained_outside_adapters(adapter_path: Path, model: nn.Module) -> list[str]:
    """The run's saved tensors that are parameters outside the adapter layers (the head)."""
    layers = list(variants.layers_of(model))
    params = dict(model.named_parameters())
    with safe_open(str(adapter_path), "pt") as f:
        return [k for k in f.keys() if k in params  # noqa: SIM118  (safe_open is no dict)
                and not any(k.startswith(layer + ".") for layer in layers)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run dir (holding adapter.safetensors)")
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--merged", type=Path, metavar="OUT", help="folder for the merged Hugging Face model")
    kind.add_argument("--peft", type=Path, metavar="OUT", help="folder for the adapter in peft's format")
    args = parser.parse_args(argv)
    adapter = args.run_dir / rundir.ADAPTER
    try:
        if not adapter.is_file():
            raise ConfigError(f"{str(args.run_dir)!r} has no {rundir.ADAPTER}; allowed: a finished run dir")
        out = args.merged or args.peft
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{str(out)!r} exists and is not empty; allowed: a new or empty folder")
        config = variants.read_adapter_config(adapter)
        model, tokenizer = load_trained(adapter)
        if args.merged:
            export_merged(model, tokenizer, out)
        else:
            base = loadable_path(config["model"], config.get("gguf_file"))  # for AutoPeftModel*.from_pretrained
            save_peft_adapter(model, out, config.get("model_type", "classification"), base,
                              trained=trained_outside_adapters(adapter, model))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
