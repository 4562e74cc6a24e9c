"""The README's install command lands on the torch a user has, not on an older one our pins would force.

A pin such as ``triton==3.6.0`` in an extra makes pip backtrack torch to the release that pins that triton (2.11 with
the whole CUDA 13 stack, 5.6 GB, on a machine whose pip sees only the public index). This resolves
``.[dev]`` together with the installed torch's release, against the public index only (no local wheels, no
constraints), as a user's fresh virtual environment would, and checks that pip keeps that torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dev_extra_resolves_with_the_installed_torch(tmp_path):
    release = Version(torch.__version__).public  # "2.13.0" for "2.13.0+cpu": the PyPI (CUDA) build of this release
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no machine-wide find-links, extra indexes or constraints
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    cmd += ["--index-url", "https://pypi.org/simple", "--report", str(report), f"{REPO}[dev]", f"torch=={release}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
    assert proc.returncode == 0, f"pip could not resolve .[dev] with torch=={release}:\n{proc.stderr[-4000:]}"
    resolved = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved.get("torch") == release, resolved.get("torch")
    assert "triton" in resolved  # the Triton interpreter tests' dependency is part of [dev]
