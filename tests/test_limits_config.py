"""Config of keys and limits: keys_file, model globs, per-key limits, the ratelimit section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from teraproxy.auth import hash_key
from teraproxy.config import ConfigError, load_config, parse_config
from tests.conftest import MODEL, run_cli, write_config

A, B = hash_key("sk-a"), hash_key("sk-b")
BASE: dict[str, Any] = {"listen": "127.0.0.1:8080",
                        "models": [{"id": MODEL, "replicas": [{"url": "http://127.0.0.1:8001"}]}]}


def problems(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    return ei.value.problems


def test_limits_and_globs() -> None:
    c = parse_config({**BASE, "auth": {"keys": [
        {"name": "a", "sha256": A, "models": ["Qwen/Qwen3-8B", "openai/*"], "requests_per_minute": 600,
         "tokens_per_minute": 200000, "max_in_flight": 16},
        {"name": "b", "sha256": B}]}})
    a, b = c.auth.keys
    assert (a.requests_per_minute, a.tokens_per_minute, a.max_in_flight) == (600, 200000, 16) and a.limited
    assert a.may_use("Qwen/Qwen3-8B") and a.may_use("openai/gpt-oss-20b")
    assert not a.may_use("Qwen/Qwen3-32B") and not a.may_use("xopenai/gpt")
    assert b.may_use("anything") and not b.limited
    assert c.ratelimit.backend == "memory" and c.ratelimit.on_backend_error == "allow"


@pytest.mark.parametrize(("key", "fragment"), [
    ({"requests_per_minute": 0}, "auth.keys[0].requests_per_minute: must be an integer >= 1"),
    ({"tokens_per_minute": "lots"}, "auth.keys[0].tokens_per_minute: must be an integer >= 1"),
    ({"max_in_flight": True}, "auth.keys[0].max_in_flight: must be an integer >= 1"),
    ({"rpm": 5}, "auth.keys[0].rpm: unknown key"),
    ({"models": ["ok", 3]}, "auth.keys[0].models: must be a list of model ids"),
])
def test_bad_key_fields(key: dict[str, Any], fragment: str) -> None:
    found = problems({**BASE, "auth": {"keys": [{"name": "a", "sha256": A, **key}]}})
    assert any(p.startswith(fragment) for p in found), found


def test_duplicate_names_are_refused() -> None:
    found = problems({**BASE, "auth": {"keys": [{"name": "a", "sha256": A}, {"name": "a", "sha256": B}]}})
    assert found == ["auth.keys[1].name: duplicate name (also auth.keys[0]): limits and metrics go by name"]


@pytest.mark.parametrize(("section", "fragment"), [
    ({"backend": "redis"}, "ratelimit.redis_url: missing"),
    ({"backend": "etcd"}, "ratelimit.backend: must be one of memory, redis"),
    ({"backend": "redis", "redis_url": "http://x"}, "ratelimit.redis_url: must be a redis://"),
    ({"redis_url": "redis://x:1/0"}, "ratelimit.redis_url: given, but ratelimit.backend is memory"),
    ({"on_backend_error": "maybe"}, "ratelimit.on_backend_error: must be one of allow, deny"),
    ({"redis_timeout": "0s"}, "ratelimit.redis_timeout: must be greater than zero"),
    ({"anonymous": {"requests_per_minute": 5}}, "ratelimit.anonymous: not supported"),
    ({"burst": 1}, "ratelimit.burst: unknown key"),
])
def test_bad_ratelimit_section(section: dict[str, Any], fragment: str) -> None:
    found = problems({**BASE, "auth": "off", "ratelimit": section})
    assert any(p.startswith(fragment) for p in found), found


def test_redis_section() -> None:
    c = parse_config({**BASE, "auth": "off", "ratelimit": {
        "backend": "redis", "redis_url": "redis://127.0.0.1:6379/0", "on_backend_error": "deny",
        "redis_timeout": "20ms", "lease_ttl": "1m", "meter_streams": True}})
    r = c.ratelimit
    assert (r.backend, r.redis_url, r.on_backend_error, r.redis_timeout, r.lease_ttl, r.meter_streams) == (
        "redis", "redis://127.0.0.1:6379/0", "deny", 0.02, 60.0, True)


def test_keys_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump(
        [{"name": "team-b", "sha256": B, "requests_per_minute": 5}]))
    cfg = write_config(tmp_path / "tp.yaml", {**BASE, "auth": {"keys_file": "keys.yaml",
                                                               "keys": [{"name": "team-a", "sha256": A}]}})
    c = load_config(cfg)
    assert [k.name for k in c.auth.keys] == ["team-a", "team-b"]
    assert c.auth.keys[1].requests_per_minute == 5 and c.auth.keys_file == str(tmp_path / "keys.yaml")
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"name": "team-b", "sha256": B}]}))
    assert len(load_config(cfg).auth.keys) == 2  # `keys:` mapping form, as in the main file


def test_keys_file_errors_name_the_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"name": "x", "sha256": "zz"}, {"name": "a", "sha256": A}]))
    cfg = write_config(tmp_path / "tp.yaml", {**BASE, "auth": {"keys_file": str(keys),
                                                               "keys": [{"name": "a", "sha256": A}]}})
    r = run_cli("check", "--config", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = sorted(r.stderr.strip().splitlines())
    assert lines == [f"teraproxy: {keys}: keys[0].sha256: must be the 64-digit hex sha256 of the bearer token",
                     f"teraproxy: {keys}: keys[1].sha256: duplicate key (also auth.keys[0])"]
    keys.write_text("- [unclosed\n")
    r = run_cli("check", "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.startswith(f"teraproxy: auth.keys_file: {keys}: invalid YAML at line")
    keys.unlink()
    r = run_cli("check", "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"teraproxy: auth.keys_file: cannot read {keys}: No such file or directory")


def test_only_a_keys_file(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump([{"name": "a", "sha256": A}]))
    c = load_config(write_config(tmp_path / "tp.yaml", {**BASE, "auth": {"keys_file": "keys.yaml"}}))
    assert c.auth.enabled and [k.name for k in c.auth.keys] == ["a"]
    (tmp_path / "keys.yaml").write_text("[]\n")
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "tp.yaml")
    assert ei.value.problems == ["auth.keys: must be a non-empty list (or name a keys_file, or write `auth: off`)"]
