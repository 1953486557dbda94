"""A study file: one base config, shared overrides, one evaluation protocol, and the variants to compare.

    name: dermamnist_cpu
    base: ../configs/dermamnist_standard.yaml      # relative to the study file
    output_dir: outputs/studies/dermamnist_cpu     # optional; relative to the working directory like train.output_dir
    experiment: study-dermamnist_cpu               # optional MLflow experiment of the parent and child runs
    set: {model.name: small_cnn, train.epochs: 12} # dotted key -> value, for every variant
    evaluate: {steps: 20, eps_l2: [0.25, 0.5]}     # keys of the evaluate section: the one protocol
    variants:
      standard: {method.name: standard}
      pgd_at: {method.name: pgd_at, method.eps: 0.5}

Every variant's config is validated before anything runs; an unknown key names the study file, the variant
and the key. The study owns ``train.output_dir`` (one folder per variant), the ``tracking`` run name,
experiment and parent, and the evaluate section (identical for every variant).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import Config, _format_errors, config_from_dict, stored_config
from pipeline.errors import InputError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
OWNED = ("evaluate.", "train.output_dir", "tracking.experiment", "tracking.run_name", "tracking.parent_run_id")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)
    base: Path
    output_dir: Path | None = None
    experiment: str | None = None
    shared: dict[str, Any] = Field(default_factory=dict, alias="set")
    evaluate: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any] | None] = Field(min_length=1)


def read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not valid YAML ({reason})") from None


def assign(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``raw[a][b][c] = value`` for the dotted ``key`` ``a.b.c``, creating sections on the way."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise InputError(f"{where}: '{key}': empty part in a dotted key")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise InputError(f"{where}: '{key}': '{part}' is not a section")
    node[parts[-1]] = copy.deepcopy(value)


def config_digest(resolved: dict[str, Any]) -> str:
    """What decides a variant's result: its resolved config (``Config.resolved()``, also stored in every
    checkpoint) without the tracking section and the progress display."""
    data = copy.deepcopy(resolved)
    data.pop("tracking", None)
    data.get("train", {}).pop("progress", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def stored_digest(resolved: dict[str, Any]) -> str:
    """:func:`config_digest` of a resolved config written by this or an earlier version (a checkpoint's or a
    variant's ``config.yaml``), read as today's config (:func:`~pipeline.config.stored_config`): a variant
    trained before the per-method config sections keeps its digest if its settings are the same."""
    try:
        return config_digest(stored_config(resolved).resolved())
    except InputError:
        return config_digest(resolved)


class Study:
    """A validated study file and the resolved config of each of its variants."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = read_yaml(self.path, "study file")
        if not isinstance(raw, dict):
            raise InputError(f"{self.path}: expected a mapping (name, base, variants, ...) at the top level")
        try:
            self.spec = StudySpec.model_validate(raw)
        except ValidationError as exc:
            raise InputError(_format_errors(str(self.path), exc)) from None
        spec = self.spec
        self.output_dir = spec.output_dir or Path("outputs") / "studies" / spec.name
        self.experiment = spec.experiment or f"study-{spec.name}"
        self.base_path = (self.path.parent / spec.base)
        self._check_keys()
        base = read_yaml(self.base_path, f"base config (base: in {self.path})")
        if not isinstance(base, dict):
            raise InputError(f"{self.base_path}: expected a mapping of sections at the top level")
        self.shared = self._shared(base)
        self.configs = {name: self._variant_config(name) for name in spec.variants}
        tasks = {cfg.task for cfg in self.configs.values()}
        if len(tasks) > 1:
            raise InputError(f"{self.path}: variants: all variants must share one task (got {sorted(tasks)})")
        self.task = tasks.pop()

    def _check_keys(self) -> None:
        problems = [f"{self.path}: variants.{name}: a variant name is a folder name (letters, digits, '_', '.', '-')"
                    for name in self.spec.variants if not _valid_name(name)]
        sections = [("set", self.spec.shared), *((f"variants.{n}", o) for n, o in self.spec.variants.items())]
        for where, overrides in sections:
            for key in overrides or {}:
                if key == "evaluate" or key.startswith(OWNED):
                    problems.append(f"{self.path}: {where}: {key}: set by the study (the protocol goes in its "
                                    "evaluate: section, output and tracking names are per variant)")
        if problems:
            raise InputError(problems)

    def variant_dir(self, name: str) -> Path:
        return self.output_dir / name

    def _shared(self, base: dict[str, Any]) -> dict[str, Any]:
        """The base config with the shared overrides and the protocol, validated on its own first so that a
        wrong key there is reported once, as the study's, not as every variant's."""
        raw = copy.deepcopy(base)
        for key, value in self.spec.shared.items():
            assign(raw, key, value, f"{self.path}: set")
        for key, value in self.spec.evaluate.items():
            assign(raw, f"evaluate.{key}", value, f"{self.path}: evaluate")
        config_from_dict(raw, f"{self.path} (base {self.spec.base} with set/evaluate)")
        return raw

    def _variant_config(self, name: str) -> Config:
        raw = copy.deepcopy(self.shared)
        where = f"{self.path}: variants.{name}"
        for key, value in (self.spec.variants[name] or {}).items():
            assign(raw, key, value, where)
        assign(raw, "train.output_dir", str(self.variant_dir(name)), where)
        assign(raw, "tracking.experiment", self.experiment, where)
        assign(raw, "tracking.run_name", name, where)
        return config_from_dict(raw, where)


def _valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None
