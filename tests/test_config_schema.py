"""The typed schema is the door: every key refuses a value of the wrong type and one outside what it
allows, in one line naming the key, through the check run.py makes before Hydra runs anything."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import variants
from schema import ConfigError
from schema.door import check_overrides
from schema.fields import Allowed, _unwrap_optional
from schema.groups import ClassificationTask, InstructionTask, Model, Tracking, Trainer
from schema.run import Run
from schema.variant import VariantKeys

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ("variant", "model", "trainer", "task", "tracking")
LM = ["model=smollm2", "task=sft"]


def _keys(cls: type, prefix: str) -> list[tuple[str, typing.Any, Allowed]]:
    """(key, type, allowed) of every leaf field of ``cls``."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in GROUPS and cls is Run:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], f.metadata.get("allowed", Allowed())))
    return out


def _wrong_type(hint: typing.Any) -> str | None:
    """A command-line value the type itself refuses."""
    inner, _ = _unwrap_optional(hint)
    if inner in (int, float):
        return "abc"
    if inner is bool:
        return "maybe"
    if typing.get_origin(inner) in (list, dict) or inner in (list, dict):
        return "abc"
    if inner is str:
        return "[1,2]"
    return None  # Any: only its rule can refuse


def _out_of_range(hint: typing.Any, allowed: Allowed) -> str | None:
    """A value of the right type outside what the field allows."""
    if allowed.choices:
        return "not_a_choice"
    if allowed.rule is not None:
        return "nonsense"
    if not allowed.within:
        return None
    within = allowed.within.strip()
    if within[0] in "[(":  # an interval: just above its upper end
        value = float(within.split(",")[1].strip(" ])")) + 1
    else:
        op, bound = within.split()
        value = {">=": float(bound) - 1, ">": float(bound), "<=": float(bound) + 1, "<": float(bound)}[op]
    inner, _ = _unwrap_optional(hint)
    return str(int(value)) if inner is int else str(value)


def _cases() -> list[tuple[str, list[str]]]:
    groups = [(Run, "", []), (Trainer, "trainer.", []), (Model, "model.", []), (Tracking, "tracking.", []),
              (ClassificationTask, "task.", ["task=mrpc"]), (InstructionTask, "task.", LM)]
    groups += [(VariantKeys, "variant.", [])]
    groups += [(cls.Settings, "variant.", [f"variant={name}"]) for name, cls in sorted(variants.VARIANTS.items())
               if (CONF / "variant" / f"{name}.yaml").is_file()]  # not the variants other tests register
    cases, seen = [], set()
    for cls, prefix, base in groups:
        for key, hint, allowed in _keys(cls, prefix):
            for value in (_wrong_type(hint), _out_of_range(hint, allowed)):
                if value is None or key in ("variant.name", "task.type") or (key, value, tuple(base)) in seen:
                    continue
                seen.add((key, value, tuple(base)))
                cases.append((f"{key}={value}", base))
    return cases


CASES = _cases()


def test_every_key_is_covered():
    keys = {case.split("=")[0] for case, _ in CASES}
    assert {"trainer.lr", "trainer.early_stopping.patience", "variant.orth_reg_weight", "variant.beta1",
            "variant.init_std", "task.chat_template", "model.dropout", "rank"} <= keys
    assert len(CASES) > 150


@pytest.mark.parametrize("override, base", CASES, ids=[c for c, _ in CASES])
def test_a_refused_value_is_one_line_naming_the_key(override, base):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError) as err:
        check_overrides([*base, override], CONF)
    message = str(err.value)
    assert "\n" not in message
    assert key in message, message  # (an interpolated copy of it, e.g. variant.dropout, may be named too)


def test_the_issues_examples_are_refused_in_one_line():
    """variant.orth_reg_weight=abc and variant.beta1='0.5' once ended in a TypeError, and
    variant.init_std=-1 was accepted."""
    for override, expected in (
        ("variant.orth_reg_weight=abc", "variant.orth_reg_weight='abc' must be a finite number >= 0"),
        ("variant.init_std=-1", "variant.init_std=-1.0 must be a finite number > 0"),
    ):
        with pytest.raises(ConfigError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
            check_overrides(["variant=adalora", override], CONF)
    check_overrides(["variant=adalora", "variant.beta1='0.5'"], CONF)  # a quoted number is that number


def test_every_value_of_a_sweep_is_checked_before_any_job():
    check_overrides(["trainer.lr=1e-4,3e-4", "seed=0,1"], CONF)
    with pytest.raises(ConfigError, match=r"^trainer\.lr='abc'"):
        check_overrides(["trainer.lr=1e-4,abc", "seed=0,1"], CONF)


def test_a_misspelt_key_names_the_closest_and_exits_2(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer\.maxsteps is not a config key; closest: trainer\.max_steps$"):
        check_overrides(["trainer.maxsteps=5"], CONF)
    result = subprocess.run([sys.executable, "run.py", "trainer.maxsteps=5", f"hydra.run.dir={tmp_path / 'r'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: trainer.maxsteps is not a config key; closest: trainer.max_steps"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_the_defaults_pass_and_every_shipped_file_composes():
    check_overrides([], CONF)
    for variant in sorted(p.stem for p in (CONF / "variant").glob("*.yaml")):
        check_overrides([f"variant={variant}"], CONF)
    for task in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "smoke"):
        check_overrides([f"task={task}"], CONF)
    check_overrides(["model=smollm2", "task=sft_smoke"], CONF)
    check_overrides(["model=roberta_base", "+experiment=lora_paper_roberta_base", "task=rte"], CONF)
    check_overrides(["+experiment=glue_minilm_converged", "task=stsb", "variant=full,lora"], CONF)
    check_overrides(["+experiment=glue_minilm_comparison", "task=stsb"], CONF)


def test_a_yaml_file_holds_only_what_differs_from_the_schema():
    """conf/ files restate no default: each value written there is one the schema does not have."""
    from omegaconf import OmegaConf

    from schema.door import VARIANT_NODES

    for path in sorted((CONF / "variant").glob("*.yaml")):
        written = OmegaConf.to_container(OmegaConf.load(path))
        written.pop("defaults", None)
        defaults = OmegaConf.to_container(OmegaConf.structured(VARIANT_NODES[path.stem]))
        same = [k for k, v in written.items() if k != "name" and k in defaults and defaults[k] == v]
        assert not same, f"{path.name} restates defaults: {same}"


def test_the_knobs_page_is_the_schemas():
    """docs/knobs.md is written from the schema; a field changed without rewriting it fails here."""
    # the command the docstring names, in its own process: variants other tests register stay out of it
    written = subprocess.run([sys.executable, "-m", "schema.docs"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert (ROOT / "docs" / "knobs.md").read_text() == written, "run: python -m schema.docs > docs/knobs.md"


def test_what_fsdp_cannot_shard_is_refused_in_one_line():
    """bitsandbytes' paged optimizers size their state from the whole tensor, and its int8 layer
    keeps its scales on the weight tensor that sharding replaces."""
    for overrides, expected in (
        (["trainer.optimizer=paged_adamw_32bit"], "trainer.optimizer=paged_adamw_32bit cannot step parameters"),
        (["variant=qlora", "variant.quant_type=int8"], "variant.quant_type=int8 cannot be sharded"),
    ):
        with pytest.raises(ConfigError, match="^" + expected) as err:
            check_overrides([*overrides, "trainer.strategy=fsdp"], CONF)
        assert "\n" not in str(err.value) and "allowed there" in str(err.value)
        check_overrides([*overrides, "trainer.strategy=ddp"], CONF)
