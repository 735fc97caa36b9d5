"""TLS with certificates the test makes (openssl CLI): the API listener through the openai SDK, a
certificate renewed by a reload, and https:// replicas verified against `ca` (or not, with verify: false)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from teraproxy import tls
from teraproxy.app import RELOADER
from teraproxy.config import TLSConfig
from teraproxy.sim import SimOptions, create_sim_app

from .conftest import MODEL, Cluster, free_port, write_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
MSGS = [{"role": "user", "content": "hi"}]


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, pem = d / f"{name}.key", d / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", pem, "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return pem, key


def make_cert(d: Path, ca: tuple[Path, Path], name: str) -> tuple[Path, Path]:
    key, csr, pem, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", f"/CN={name}"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                    "-out", pem, "-days", "2", "-extfile", ext], check=True, capture_output=True)
    return pem, key


def _peer_cn(port: int, cafile: Path) -> tuple[str, str | None, str | None]:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        cert = s.getpeercert()
        subject = dict(x[0] for x in cert["subject"])  # type: ignore[index,misc]
        return str(subject["commonName"]), s.selected_alpn_protocol(), s.version()


async def test_api_over_tls_with_the_sdk_and_a_certificate_renewed_by_reload(cluster: Cluster,
                                                                            tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca")
    cert, key = make_cert(tmp_path, ca, "first")
    r = await cluster.replica()
    port = free_port()
    raw: dict[str, Any] = {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{free_port()}",
                           "auth": "off", "health": {"enabled": False}, "log": {"access_log": False},
                           "tls": {"cert": str(tmp_path / "live.pem"), "key": str(tmp_path / "live.key")},
                           "models": [{"id": MODEL, "replicas": [{"url": r.url}]}]}
    shutil.copy(cert, tmp_path / "live.pem")
    shutil.copy(key, tmp_path / "live.key")
    path = write_config(tmp_path / "c.yaml", raw)
    p = await cluster.proxy_from_file(path)
    verify = ssl.create_default_context(cafile=str(ca[0]))
    async with openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                                  http_client=openai.DefaultAsyncHttpxClient(verify=verify)) as client:
        out = await client.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
        assert out.choices[0].message.content
    assert await _in_thread(_peer_cn, port, ca[0]) == ("first", "http/1.1", "TLSv1.3")
    # the certificate is renewed on disk; a reload makes new handshakes use it, no restart
    cert2, key2 = make_cert(tmp_path, ca, "second")
    shutil.copy(cert2, tmp_path / "live.pem")
    shutil.copy(key2, tmp_path / "live.key")
    assert p.app[RELOADER].reload() == []
    assert (await _in_thread(_peer_cn, port, ca[0]))[0] == "second"
    # a key that does not match the certificate is refused before anything changes
    shutil.copy(key, tmp_path / "live.key")
    problems = p.app[RELOADER].reload()
    assert len(problems) == 1 and problems[0].startswith("tls: cannot load certificate")
    assert (await _in_thread(_peer_cn, port, ca[0]))[0] == "second"
    ctx = tls.server_context(TLSConfig(str(cert2), str(key2)))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.options & ssl.OP_NO_COMPRESSION


async def _in_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


async def _tls_sim(cert: tuple[Path, Path]) -> tuple[web.AppRunner, str]:
    app, _ = create_sim_app(SimOptions(model=MODEL))
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    return runner, f"https://127.0.0.1:{port}"


@pytest.mark.parametrize("replica", [{"ca": True}, {"verify": False}, {}], ids=["ca", "no-verify", "system-store"])
async def test_https_replica_verified_against_its_ca(cluster: Cluster, tmp_path: Path, replica: dict[str, Any]) -> None:
    ca = make_ca(tmp_path, "replica-ca")
    runner, url = await _tls_sim(make_cert(tmp_path, ca, "replica"))
    cluster.runners.append(runner)
    rep: dict[str, Any] = {"url": url}
    if replica.get("ca"):
        rep["ca"] = str(ca[0])
    if "verify" in replica:
        rep["verify"] = replica["verify"]
    p = await cluster.proxy(models=[{"id": MODEL, "replicas": [rep]}])
    async with openai.AsyncOpenAI(base_url=p.v1, api_key="x", max_retries=0) as client:
        if replica:
            out = await client.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
            assert out.choices[0].message.content
        else:  # a private CA is not in the system store: the replica is not trusted
            with pytest.raises(openai.InternalServerError) as e:
                await client.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
            assert "CERTIFICATE_VERIFY_FAILED" in str(e.value.body)
