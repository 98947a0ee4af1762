"""The one place a config is checked: typed against the schema, every value against what its
field allows, every failure as one line naming the key, the value and what is allowed.

``check_overrides`` runs before Hydra (``run.py``): it composes the config of every job the command
line describes, as Hydra will, so a typo or a value of the wrong type is refused before anything
is written, with the closest known key. ``typed`` checks a composed config (what
``run_experiment`` is given) and returns it as the schema's dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from .errors import ConfigError
from .fields import Allowed, problems, refusal
from .groups import ClassificationTask, InstructionTask
from .run import Run

TASK_SCHEMAS = {"classification": ClassificationTask, "causal_lm": InstructionTask}
VARIANT_NODES: dict[str, type] = {}  # name -> the variant group's node (variants register theirs: schema.store)
MAX_JOBS_COMPOSED = 64  # a larger sweep is checked one swept key at a time


def typed(cfg: DictConfig) -> Run:
    """``cfg`` as the schema's dataclasses, every value checked; a ``ConfigError`` listing every
    problem (one line) when any value is refused."""
    base = OmegaConf.structured(Run)
    variant = cfg.get("variant") or {}
    if variant.get("name") in VARIANT_NODES:
        base.variant = OmegaConf.structured(VARIANT_NODES[variant["name"]])
    task_type = (cfg.get("task") or {}).get("type", "classification")
    base.task = OmegaConf.structured(TASK_SCHEMAS.get(task_type, ClassificationTask))
    try:
        # an untyped copy: a config a launcher (joblib, submitit) pickled into its worker carries the
        # composing process's node classes, onto which OmegaConf refuses to merge this process's schema
        run = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(OmegaConf.to_container(cfg))))
    except OmegaConfBaseException as err:
        raise ConfigError(one_line(err, base)) from None
    found = problems(run, "") + _between_groups(run)
    if found:
        raise ConfigError("; ".join(found))
    return run


def _between_groups(run: Run) -> list[str]:
    task_type = getattr(run.task, "type", None)
    if task_type is not None and task_type != run.model.type:
        example = "model=smollm2" if task_type == "causal_lm" else "model=minilm"
        return [(f"task={run.task.name} is a {task_type} task but the model is model.type={run.model.type} "
                 f"({run.model.name_or_path}); allowed: a {task_type} model, e.g. {example}")]
    if run.trainer.strategy == "fsdp" and getattr(run.variant, "quant_type", None) == "int8":
        return [("variant.quant_type=int8 cannot be sharded by trainer.strategy=fsdp (bitsandbytes keeps the int8 "
                 "scales on the weight tensor, which sharding replaces); allowed there: nf4, fp4")]
    return []


def one_line(err: Exception, schema: DictConfig | Callable[[], DictConfig | None] | None = None) -> str:
    """An OmegaConf or Hydra failure as ``key=value must be ...``, ``key is not a config key;
    closest: ...`` (among the keys of ``schema``, or of what it returns: composed only then), or
    the first line of its message."""
    cause = err
    while cause.__cause__ is not None and not hasattr(cause, "full_key"):
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return _unknown_key(_override_key(err) or key, schema() if callable(schema) else schema)
    if isinstance(cause, ValidationError) and key:
        field = _field(getattr(cause, "object_type", None), getattr(cause, "key", None))
        if field is not None:
            hint, allowed = field
            return refusal(key, getattr(cause, "value", None), hint, allowed)
    if isinstance(cause, InterpolationResolutionError):
        return f"{key or 'config'}: {_first_line(cause)}"
    return _first_line(err)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _override_key(err: Exception) -> str | None:
    """The key an ``Could not override 'trainer.maxsteps'`` message names."""
    text = str(err)
    if "override '" in text:
        return text.split("override '", 1)[1].split("'", 1)[0]
    return None


def _field(cls: Any, name: Any) -> tuple[Any, Allowed] | None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    for f in dataclasses.fields(cls):
        if f.name == name:
            return typing.get_type_hints(cls)[f.name], f.metadata.get("allowed", Allowed())
    return None


def _unknown_key(key: str, schema: DictConfig | None) -> str:
    known = sorted(_keys(schema)) if schema is not None else []
    group = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in known if k.count(".") == key.count(".") and (k.rsplit(".", 1)[0] if "." in k else "") == group]
    names = {k.rsplit(".", 1)[-1]: k for k in siblings}
    closest = [names[n] for n in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(names), n=1, cutoff=0.6)]
    hint = f"closest: {closest[0]}" if closest else f"allowed: {', '.join(siblings)}" if siblings else ""
    return f"{key} is not a config key" + (f"; {hint}" if hint else "")


def _keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, DictConfig):
        return []
    keys = []
    for name in node:
        key = f"{prefix}{name}"
        keys.append(key)
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            keys += _keys(child, f"{key}.")
    return keys


def check_overrides(overrides: list[str], conf_dir: Path, config_name: str = "config") -> None:
    """Compose and check the config of every job ``overrides`` describes (a sweep's comma lists,
    ranges and globs expanded as Hydra's basic sweeper does), before Hydra runs any; a
    ``ConfigError`` in one line for the first refused."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    mine = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(mine)
    except HydraException as err:  # a malformed override: Hydra's parser names it
        raise ConfigError(_first_line(err)) from None
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        for job in _jobs(parsed, BasicSweeper):
            try:
                cfg = compose(config_name, overrides=job)
            except (HydraException, OmegaConfBaseException) as err:
                raise ConfigError(one_line(err, partial(_schema_view, compose, config_name, job))) from None
            typed(cfg)


def _jobs(parsed: list, sweeper: Any) -> list[list[str]]:
    """Every job's overrides, or, for a sweep too large to compose whole, each swept key's values
    with every other key at its first."""
    batches = sweeper.split_arguments(parsed, None)
    jobs = [job for batch in batches for job in batch]
    if len(jobs) <= MAX_JOBS_COMPOSED:
        return jobs or [[]]
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in parsed]
    firsts = [axis[0] for axis in axes]
    return [firsts[:i] + [v] + firsts[i + 1:] for i, axis in enumerate(axes) for v in axis[1:]] + [firsts]


def _schema_view(compose: Any, config_name: str, job: list[str]) -> DictConfig | None:
    """The config without the job's refused key, to find the key closest to a misspelt one."""
    kept = [o for o in job if not o.lstrip("+~").split("=", 1)[0].count(".")]  # group choices only
    try:
        return compose(config_name, overrides=kept)
    except (HydraException, OmegaConfBaseException):
        return None

