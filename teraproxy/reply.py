"""Complete answers written to the client's transport in one write, without web.Response; and
the encoded head of an SSE answer (relay.py writes it with the stream's first bytes).

aiohttp's road for a complete body (web.Response → prepare → headers multidict → write_headers →
write_eof) cost about a fifth of the proxy's CPU per non-streamed request. Here the status line and
the fixed headers are encoded once per (HTTP version, status), and only Content-Type,
Content-Length, X-Request-ID, Date and the key's x-ratelimit-* headers are added per answer; head
and body go out in one ``writelines``. aiohttp gets back a :class:`Sent`: an already finished
response (its prepare and write_eof return at once) that tells it the status and whether the
connection stays open.

Invariants (aiohttp's, kept): the status line carries the request's HTTP version; an HTTP/1.1
answer on a connection that will close says ``Connection: close``, an HTTP/1.0 one that stays open
says ``Connection: keep-alive``; ``writer.output_size`` counts the bytes written, so the edge
knows the answer has begun (edge.Protocol: no 102 probe, no second answer after it).
"""

from __future__ import annotations

import time
from http import HTTPStatus

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion11

from teraproxy.ratelimit import Decision

_FIXED = b"\r\nServer: teraproxy\r\n"
_OCTETS = b"application/octet-stream"
_SSE = b"Content-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"


def _status_line(version: tuple[int, int], status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/{version[0]}.{version[1]} {status} {reason}".encode("latin-1") + _FIXED


class Heads:
    """Encoded status lines (with the fixed headers), built once per (version, status); and the Date
    header's value, made once a second (aiohttp's formatter is an interpreted call per answer)."""

    __slots__ = ("_date", "_date_at", "lines")

    def __init__(self) -> None:
        self.lines: dict[tuple[tuple[int, int], int], bytes] = {}
        self._date = b""
        self._date_at = -1

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = rfc822_formatted_time().encode()
        return self._date

    def line(self, version: tuple[int, int], status: int) -> bytes:
        key = (version, status)
        got = self.lines.get(key)
        if got is None:
            got = self.lines[key] = _status_line(version, status)
        return got


class Sent(web.StreamResponse):
    """An answer already written to the transport: what aiohttp's request loop needs of it
    (status, keep_alive, prepare/write_eof as no-ops), without headers, cookies or a writer."""

    def __init__(self, status: int, keep_alive: bool) -> None:  # no super().__init__: nothing it builds is used
        self._status = status
        self._reason = ""
        self._keep_alive = keep_alive
        self._eof_sent = True
        self._payload_writer = None
        self._req = None

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def _head(heads: Heads, parts: list[bytes], version: tuple[int, int], rid: str, decision: Decision | None,
          keep_alive: bool, chunked: bool) -> bytes:
    """An encoded head: ``parts`` (the status line and the caller's header lines), then X-Request-ID,
    Date, the key's x-ratelimit-*, and how an HTTP/1.x client knows the body's end and whether the
    connection stays open."""
    parts += (b"X-Request-ID: ", rid.encode(), b"\r\nDate: ", heads.date(), b"\r\n")
    if decision is not None:
        parts.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in decision.headers().items())
    if version >= HttpVersion11:
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
    elif keep_alive:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def stream_head(heads: Heads, request: web.BaseRequest, rid: str, decision: Decision | None) -> tuple[bytes, bool]:
    """The encoded head of an SSE answer (200), and whether the connection stays open after it.
    HTTP/1.1: a chunked body (relay._Sink frames the chunks); HTTP/1.0: a body that ends when the
    connection closes, so the connection closes whatever the client asked."""
    version = request.version
    keep_alive = version >= HttpVersion11 and request.keep_alive and request.content.is_eof()
    return _head(heads, [heads.line(version, 200), _SSE], version, rid, decision, keep_alive, True), keep_alive


def send(heads: Heads, request: web.BaseRequest, status: int, rid: str, body: bytes,
         content_type: bytes | None, extra: bytes = b"", decision: Decision | None = None) -> Sent:
    """Write a complete answer. ``extra``: encoded header lines (``Name: value\\r\\n``) to add.
    When the client is gone already, nothing is written (the caller's access log says 499)."""
    keep_alive = request.keep_alive and request.content.is_eof()  # a body not read to its end: close
    version = request.version
    head = _head(heads, [heads.line(version, status), b"Content-Type: ", content_type or _OCTETS,
                         b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n", extra],
                 version, rid, decision, keep_alive, False)
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.writelines((head, body))
        request.writer.output_size += len(head) + len(body)
    return Sent(status, keep_alive)
