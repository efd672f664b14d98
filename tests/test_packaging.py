"""The sdist and the wheel: the sdist carries what its own tests need; the wheel installs and runs without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
# Building and installing takes a while and needs the package index (for the wheel's dependencies, through pip's
# cache): CI runs it, a developer with NATFWD_TEST_PACKAGING=1.
pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(
        not IN_CI and not os.environ.get("NATFWD_TEST_PACKAGING"),
        reason="builds and installs the package; set NATFWD_TEST_PACKAGING=1 (CI runs it)",
    ),
    pytest.mark.timeout(900),
]


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc  # type: ignore[no-any-return]


def test_sdist_and_wheel_build_and_the_wheel_runs_without_a_compiler(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # CC=false: no compiler, so the optional C extensions fail to build and the wheel is the pure-Python one.
    # The wheel is built from the sdist (build's default), which proves the sdist is complete enough to build.
    no_compiler = {**os.environ, "CC": "false", "CXX": "false"}
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)], env=no_compiler)
    (sdist,) = dist.glob("natfwd-*.tar.gz")
    (wheel,) = dist.glob("natfwd-*.whl")

    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "README.md",
        "CONTRIBUTING.md",
        "CHANGELOG.md",
        "config.example.yaml",
        "deploy/alerts.yaml",
        "deploy/grafana-dashboard.json",
        "docs/operations.md",
        "tests/conftest.py",
        "tests/test_packaging.py",
        "forwarder/_crelay.c",
        "forwarder/protocols/_cframing.c",
    ):
        assert needed in names, f"the sdist lacks {needed}"

    with zipfile.ZipFile(wheel) as archive:
        wheel_names = archive.namelist()
        (metadata_name,) = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert not [n for n in wheel_names if n.endswith(".so")], "built with CC=false, yet the wheel holds a C extension"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel_names)
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert 'Requires-Dist: uvloop>=0.19; sys_platform != "win32"' in metadata.splitlines()

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel)], env=no_compiler)
    natfwd = venv / "bin" / "natfwd"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    version = run([str(natfwd), "--version"], env=clean, cwd=tmp_path)
    assert version.stdout.strip() == "natfwd 0.1.0"
    lab_help = run([str(natfwd), "lab", "--help"], env=clean, cwd=tmp_path)
    assert lab_help.stdout.startswith("usage: natfwd lab")
    # The installed copy runs the pure-Python path, and says so in natfwd_build_info.
    extensions = run(
        [str(python), "-c", "from forwarder import metrics; print(metrics.loaded_extensions())"],
        env=clean,
        cwd=tmp_path,
    )
    assert extensions.stdout.strip() == "none"
