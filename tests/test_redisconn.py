"""redisconn.py against a real redis-server (and a hostile fake): pipelining, AUTH/SELECT, failures."""

from __future__ import annotations

import asyncio

import pytest

from teraproxy.redisconn import RedisConn, RedisError, encode
from tests.conftest import free_port
from tests.redisd import RedisServer


def test_encode() -> None:
    assert encode("SET", b"k", 5, 1.5) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$3\r\n1.5\r\n"


async def test_concurrent_calls_get_their_own_replies(redis_server: RedisServer) -> None:
    conn = RedisConn(redis_server.url, 2.0)
    try:
        replies = await asyncio.gather(*(conn.call(encode("ECHO", f"v{i}")) for i in range(500)))
        assert replies == [f"v{i}".encode() for i in range(500)]  # one connection, replies in order
        with pytest.raises(RedisError, match="ERR unknown command"):
            await conn.call(encode("NOSUCHCOMMAND"))
        assert await conn.call(encode("PING")) == b"PONG"  # an error reply does not break the stream
    finally:
        await conn.close()


async def test_reconnects_after_a_restart(redis_server: RedisServer) -> None:
    conn = RedisConn(redis_server.url, 2.0)
    try:
        assert await conn.call(encode("PING")) == b"PONG"
        redis_server.kill()
        with pytest.raises(RedisError):
            await conn.call(encode("PING"))
        redis_server.start()
        assert await conn.call(encode("PING")) == b"PONG"
    finally:
        await conn.close()


async def test_reset_fails_pending_calls(redis_server: RedisServer) -> None:
    conn = RedisConn(redis_server.url, 2.0)
    try:
        await conn.call(encode("PING"))
        pending = asyncio.ensure_future(conn.call(encode("BLPOP", "nothing", "5")))
        await asyncio.sleep(0.05)
        conn.reset()  # what a timeout does: the late reply can never reach the next caller
        with pytest.raises(RedisError):
            await pending
        assert await conn.call(encode("ECHO", "fresh")) == b"fresh"
    finally:
        await conn.close()


async def test_password_and_database() -> None:
    server = RedisServer(extra=("--requirepass", "s3cret")).start()
    try:
        conns = [RedisConn(f"redis://:s3cret@127.0.0.1:{server.port}/{db}", 2.0) for db in (3, 0)]
        await conns[0].call(encode("SET", "where", "db3"))
        assert await conns[0].call(encode("GET", "where")) == b"db3"
        assert await conns[1].call(encode("GET", "where")) is None  # SELECT took effect
        wrong = RedisConn(f"redis://:nope@127.0.0.1:{server.port}/0", 2.0)
        with pytest.raises(RedisError):
            await wrong.call(encode("PING"))
        for c in (*conns, wrong):
            await c.close()
    finally:
        server.stop()


async def test_a_server_that_speaks_garbage() -> None:
    done = asyncio.Event()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"?this is not RESP\r\n")
        await reader.read()  # until the client hangs up on us
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = RedisConn(f"redis://127.0.0.1:{port}/0", 2.0)
    try:
        with pytest.raises(RedisError, match="protocol error"):
            await conn.call(encode("PING"))
        await asyncio.wait_for(done.wait(), 5)  # it dropped the connection
    finally:
        await conn.close()
        server.close()
        await server.wait_closed()


async def test_nothing_listening() -> None:
    conn = RedisConn(f"redis://127.0.0.1:{free_port()}/0", 1.0)
    with pytest.raises(RedisError, match="cannot connect"):
        await conn.call(encode("PING"))
    await conn.close()
