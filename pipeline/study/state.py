"""What a study remembers between invocations: one small JSON file per variant, one for the study.

``<output_dir>/<variant>/variant.json`` holds the digest of the variant's resolved config, its status
(``new`` -> ``training`` -> ``trained`` -> ``evaluated``), its MLflow run, its wall times, and the
degenerate-model note of its evaluation. ``<output_dir>/study.json`` holds the MLflow parent run. Files are
replaced atomically, so a kill at any moment leaves the old or the new state.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

CHECKPOINT = Path("checkpoints") / "last.pt"   # where train() writes it, under the variant's train.output_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable study state file ({exc}); delete it to start that part anew") \
            from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a study state file (expected a JSON object)")
    return data


@dataclass
class VariantState:
    folder: Path
    digest: str = ""
    status: str = "new"                 # new | training | trained | evaluated
    run_id: str | None = None
    evaluation_dir: str | None = None   # relative to the folder
    train_s: float = 0.0                # wall time, summed over interrupted attempts
    eval_s: float = 0.0
    attempt_started: float | None = None
    attempts: int = 0
    degenerate: str | None = None       # why the model looks degenerate, if it does

    @property
    def path(self) -> Path:
        return self.folder / "variant.json"

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT

    @classmethod
    def load(cls, folder: Path) -> VariantState:
        data = _read_json(Path(folder) / "variant.json")
        known = {f.name for f in fields(cls)} - {"folder"}
        return cls(Path(folder), **{k: v for k, v in data.items() if k in known})

    def save(self) -> None:
        data = asdict(self)
        data.pop("folder")
        _write_json(self.path, data)


@dataclass
class StudyState:
    path: Path
    parent_run_id: str | None = None
    tracking_uri: str | None = None

    @classmethod
    def load(cls, output_dir: Path) -> StudyState:
        data = _read_json(Path(output_dir) / "study.json")
        return cls(Path(output_dir) / "study.json", data.get("parent_run_id"), data.get("tracking_uri"))

    def save(self) -> None:
        _write_json(self.path, {"parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri})
