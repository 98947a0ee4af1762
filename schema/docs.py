"""docs/knobs.md, written from the schema: every key's type, default, allowed values and doc, so
the docs say what the code checks and nothing is written twice. A test compares the file with
this output; after changing a field, run ``python -m schema.docs > docs/knobs.md``."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from .fields import Allowed, type_text
from .groups import ClassificationTask, InstructionTask, Model, Tracking, Trainer
from .run import Run
from .variant import VariantKeys

HEADER = """# Every config key

Written by `python -m schema.docs` from the schema (`schema/` and each variant's `Settings`), which is
where a key's type, default and meaning live; the files of `conf/` hold only what differs from these
defaults. A value outside *allowed* is refused before anything runs, in one line naming the key
(exit 2). Set any key on the command line: `python run.py trainer.lr=3e-4 variant.dropout=0`.
"""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, str)) or value is None else str(value).lower() \
        if isinstance(value, bool) else str(value)


def rows(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    """A table row per field of ``cls`` (nested dataclasses as ``prefix.key.sub``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        if dataclasses.is_dataclass(default):
            out += rows(type(default), f"{prefix}{f.name}.")
            continue
        allowed: Allowed = f.metadata.get("allowed", Allowed())
        out.append(f"| `{prefix}{f.name}` | {type_text(hints[f.name])} | `{_cell(default)}` | "
                   f"{allowed.describe().replace('|', '/')} | {f.metadata.get('doc', '').replace('|', '/')} |")
    return out


def table(title: str, cls: type, prefix: str, skip: tuple[str, ...] = (), intro: str = "") -> str:
    head = ["", f"## {title}", ""] + ([intro, ""] if intro else [])
    return "\n".join(head + ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
                     + rows(cls, prefix, skip))


def page(variant_settings: dict[str, type]) -> str:
    """The whole page; ``variant_settings``: name -> the variant's ``Settings`` (its own keys)."""
    groups = [
        table("Top level", Run, "", skip=("variant", "model", "trainer", "task", "tracking")),
        table("trainer", Trainer, "trainer."),
        table("model", Model, "model.", intro="Each file of `conf/model/` sets what differs for its model."),
        table("task: classification", ClassificationTask, "task.",
              intro="GLUE tasks and the offline smoke task (`conf/task/`)."),
        table("task: instruction tuning", InstructionTask, "task.",
              intro="`task=sft` (JSONL or hub data) and `task=sft_smoke` (offline); they need a causal LM."),
        table("tracking", Tracking, "tracking."),
        table("variant: keys of every variant", VariantKeys, "variant.",
              intro="Each `conf/variant/<name>.yaml` sets its own `lr` and `targets`."),
    ]
    for name, settings in sorted(variant_settings.items()):
        if any(f.name not in {g.name for g in dataclasses.fields(VariantKeys)} for f in dataclasses.fields(settings)):
            groups.append(table(f"variant={name}", settings, "variant.",
                                intro=(settings.__doc__ or "").strip().splitlines()[0]))
    return HEADER + "\n".join(groups) + "\n"


if __name__ == "__main__":
    import variants

    print(page({name: cls.Settings for name, cls in variants.VARIANTS.items()}), end="")
