"""TLS contexts: the API listener's (``tls:``) and the ones for ``https://`` replicas.

Server side: TLS 1.2 or newer, ALPN ``http/1.1`` only (the API is HTTP/1.1), no TLS compression,
the ssl module's default (forward-secret AEAD) ciphers. The certificate is re-read on every reload
into the same context, so new handshakes get a renewed certificate without a restart; a reload first
loads the files into a scratch context, so a bad pair is refused (naming the key) and never half-loaded.

Client side: a replica's certificate is verified against the system store, or against
``replicas[].ca`` when given; ``verify: false`` switches verification off for that replica only.
"""

from __future__ import annotations

import ssl

from teraproxy.config import Config, ReplicaConfig, TLSConfig


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def check(config: Config) -> list[str]:
    """Problems loading the configured certificate and key (for a reload, before anything changes)."""
    if config.tls is None:
        return []
    try:
        server_context(config.tls)
    except (OSError, ssl.SSLError) as e:
        return [f"tls: cannot load certificate {config.tls.cert} with key {config.tls.key}: "
                f"{getattr(e, 'reason', None) or e.strerror or e}"]
    return []


def reload_cert(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    """Put a (checked) renewed certificate into the live context: new handshakes use it."""
    ctx.load_cert_chain(tls.cert, tls.key)


def client_context(cfg: ReplicaConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
