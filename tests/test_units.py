"""The shipped systemd units pass `systemd-analyze verify` (unknown keys and bad values are errors here),
and their stop timeout leaves room for the drain."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from teraproxy.config import ShutdownConfig

from .conftest import ROOT

UNITS = ROOT / "systemd"
INSTALLED = "/opt/teraproxy/.venv/bin/teraproxy"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (.ci/run installs the systemd package)")
def test_units_verify_clean(tmp_path: Path) -> None:
    # verify checks that ExecStart= binaries exist: point them at this checkout's teraproxy
    teraproxy = str(Path(sys.executable).with_name("teraproxy"))
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, teraproxy))
    shutil.copy(tmp_path / "teraproxy@.service", tmp_path / "teraproxy@9101.service")  # an instance of the template
    names = ["teraproxy.service", "teraproxy.socket", "teraproxy@9101.service"]
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values but names each one: any output is a finding
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


@pytest.mark.parametrize("name", ["teraproxy.service", "teraproxy@.service"])
def test_units_notify_and_stop_after_the_drain(name: str) -> None:
    text = (UNITS / name).read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["RestartPreventExitStatus"] == "2" and settings["Restart"] == "on-failure"
    assert float(settings["TimeoutStopSec"].removesuffix("s")) > ShutdownConfig().drain
    assert "kill -HUP $MAINPID" in text and "teraproxy check" in settings["ExecStartPre"]
