"""The proxy's error hierarchy and the one function that renders an error as OpenAI JSON.

Every error teraproxy itself produces is a ProxyError subclass carrying its HTTP status,
OpenAI error ``type`` and a string ``code`` (the Tera spec types ``code`` as a string).
Invariant: each class maps to exactly one status; tests check every subclass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

ECHO_MAX = 256  # characters of a client's string echoed in an answer or logged


def echo(text: str) -> str:
    """A client's string as we may repeat it: whole up to ECHO_MAX characters, cut with an ellipsis beyond."""
    return text if len(text) <= ECHO_MAX else text[:ECHO_MAX] + "…"


def error_body(message: str, type_: str, code: str | None) -> bytes:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


class ProxyError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # per-instance override of the class default
        self.headers: Mapping[str, str] = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BadHttpRequest(BadRequest):
    """The request could not be parsed as HTTP (answered by edge.Protocol, before any route)."""

    code = "bad_http_request"


class AuthError(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    @classmethod
    def absent(cls, model: str) -> ModelNotFound:
        """One message for a model that is not served and for one the key may not use: a key must
        not learn which models exist beyond those it may use (``/v1/models`` hides them too)."""
        return cls(f"The model '{echo(model)}' does not exist or you do not have access to it.")


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class RateLimitUnavailable(ProxyError):
    """ratelimit.on_backend_error is deny and the shared limiter (Redis) did not answer in time."""

    status = 503
    type = "server_error"
    code = "rate_limit_unavailable"


class UpstreamError(ProxyError):
    """The replica was unreachable, broke the connection, or answered something unusable."""

    status = 502
    type = "server_error"
    code = "bad_gateway"


class NoHealthyReplica(ProxyError):
    status = 503
    type = "server_error"
    code = "no_healthy_replica"


class QueueFull(ProxyError):
    """Every replica of the model is at its max_in_flight and its admission queue is full."""

    status = 503
    type = "server_error"
    code = "queue_full"


class QueueTimeout(ProxyError):
    """The request waited queue.timeout in the model's admission queue without a free replica."""

    status = 503
    type = "server_error"
    code = "queue_timeout"


class UpstreamBusy(ProxyError):
    """All of the gateway's own upstream connections (upstream.max_connections) stayed busy:
    the gateway's congestion, not a replica's fault (no breaker is charged, nothing is retried)."""

    status = 503
    type = "server_error"
    code = "upstream_busy"


class ShuttingDown(ProxyError):
    """The drain time (shutdown.drain) ran out before this request's answer was complete."""

    status = 503
    type = "server_error"
    code = "server_shutting_down"


class GatewayTimeout(ProxyError):
    """The replica did not answer in time (or went silent)."""

    status = 504
    type = "server_error"
    code = "gateway_timeout"


def all_error_classes() -> list[type[ProxyError]]:
    """ProxyError and every subclass, depth first (used by tests and docs)."""
    out: list[type[ProxyError]] = []
    todo: list[type[ProxyError]] = [ProxyError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


_STATUS_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
                 404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error"}


def normalise_upstream_error(status: int, body: bytes) -> bytes:
    """Turn a replica's error body into the OpenAI shape, keeping its message.

    vLLM answers ``{"object": "error", "message", "type", "code": 400}`` (older) or
    ``{"error": {...}}`` (newer); ``code`` may be an int. Anything else becomes a generic message.
    """
    try:
        doc: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        doc = None
    err: Any = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        err = doc if isinstance(doc, dict) and "message" in doc else {}
    message = err.get("message")
    if not isinstance(message, str) or not message:
        text = body[:200].decode("utf-8", "replace").strip()
        message = f"replica answered HTTP {status}" + (f": {text}" if text else "")
    type_ = err.get("type")
    if not isinstance(type_, str) or not type_:
        type_ = _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = err.get("code")
    code_s = str(code) if code is not None and code != "" else str(status)
    return orjson.dumps({"error": {"message": message, "type": type_, "param": err.get("param"), "code": code_s}})
