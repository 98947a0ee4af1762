"""Finding modules by name: what ``variant.targets`` selects, and swapping a module in place."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from schema import ConfigError

ALL_LINEAR = "all-linear"

Targets = str | Sequence[str]


def matches(name: str, suffixes: Iterable[str]) -> bool:
    """``name`` equals one of ``suffixes`` or ends with ``"." + suffix``."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def modules_named(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The modules whose qualified name equals one of ``names`` or ends with ``"." + name``."""
    names = list(names)
    return [module for name, module in model.named_modules() if matches(name, names)]


def within(name: str, roots: Iterable[str]) -> bool:
    """``name`` is a module named by ``roots`` (suffix match) or inside one, e.g.
    ``classifier.dense`` is within ``classifier`` (RoBERTa's two-layer head)."""
    return any(f".{r}." in f".{name}." for r in roots)


def task_head(model: nn.Module) -> list[str]:
    """The top-level modules of a Hugging Face model outside its pretrained backbone (the one
    ``base_model_prefix`` names), e.g. ``classifier`` or ``lm_head``: the task head, new and
    trained in full. [] for a model without such a backbone attribute (a bare backbone)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), nn.Module):
        return []
    return [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child_name, new)


def find_target_modules(model: nn.Module, targets: Targets, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules that ``targets`` selects.

    ``targets`` is ``"all-linear"`` (every linear layer except those in or inside ``exclude``
    and the model's task head, ``task_head``), a regular expression matched against the full module name, or a list of names,
    each matching a module whose qualified name equals it or ends with ``"." + name``.
    """
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(".base")
    ]
    if isinstance(targets, str):
        if targets == ALL_LINEAR:  # as peft's: never the output layer (the task head)
            return [n for n in linears if not within(n, [*exclude, *task_head(model)])]
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ConfigError(f"variant.targets={targets!r} is not a valid regex ({err})") from None
        found = [n for n in linears if pattern.fullmatch(n)]
    else:
        found = [n for n in linears if matches(n, targets)]
    if not found:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            f"variant.targets={show(targets)} matches no nn.Linear module; allowed: "
            f"'{ALL_LINEAR}', a list of names from [{', '.join(leaf_names)}], "
            f"or a regex over full names such as {linears[0]!r}"
        )
    return found


def show(targets: Targets) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))
