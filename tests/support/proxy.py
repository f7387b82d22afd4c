"""A small TCP proxy for fault injection, run by asyncio in a background thread.

Modes:
  pass       forward bytes both ways (the normal state)
  cut        reset every open connection and stop listening (new connections are refused),
             like a broker that is down
  blackhole  keep connections open but drop every byte both ways (a dead network path)

:meth:`Proxy.restore` goes back to ``pass``; connections that lost bytes while blackholed are
reset then, since their streams are corrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from tests.support.broker import free_port

T = TypeVar("T")

PASS, CUT, BLACKHOLE = "pass", "cut", "blackhole"


class _Conn:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tainted = False  # bytes were dropped: the stream can no longer be trusted

    def reset(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                _reset(w)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), like a crashed peer or a firewall reject."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    """Listen on 127.0.0.1:``port`` and forward to ``target_host:target_port``."""

    def __init__(
        self, target_port: int, *, target_host: str = "127.0.0.1", port: int | None = None
    ) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.mode = PASS
        self.accepted = 0
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"proxy-{self.port}", daemon=True
        )
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- control (from any thread) --------------------------------------------------------------

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Reset every connection now and every new one until :meth:`restore`."""
        self._call(self._set_mode(CUT))

    def blackhole(self) -> None:
        """Drop every byte, both ways, on open and new connections until :meth:`restore`."""
        self._call(self._set_mode(BLACKHOLE))

    def restore(self) -> None:
        self._call(self._set_mode(PASS))

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for conn in list(self._conns):
                conn.reset()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            self._call(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def connections(self) -> int:
        async def n() -> int:
            return len(self._conns)

        return self._call(n())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- event loop -----------------------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == CUT and self._server is not None:
            self._server.close()  # refuse new connections; open ones are reset below
            self._server = None
        elif mode != CUT:
            await self._listen()
        for conn in list(self._conns):
            if mode == CUT or (mode == PASS and conn.tainted):
                conn.reset()
            elif mode == BLACKHOLE:
                conn.tainted = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == CUT:
            _reset(writer)
            return
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            if self.mode == BLACKHOLE:
                conn.tainted = True
                await self._pump(reader, None, conn)
                return
            try:
                up_reader, conn.upstream = await asyncio.open_connection(*self.target)
            except OSError:
                _reset(writer)
                return
            if self.mode != PASS:  # cut or blackholed while connecting
                conn.reset()
                return
            await asyncio.gather(
                self._pump(reader, conn.upstream, conn), self._pump(up_reader, writer, conn)
            )
        finally:
            self._conns.discard(conn)
            for w in (writer, conn.upstream):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, conn: _Conn
    ) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode == PASS and not conn.tainted and writer is not None:
                    writer.write(data)
                    await writer.drain()
                else:
                    conn.tainted = True
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side ended: end the other too (Kafka and PostgreSQL never half-close).
            if conn.tainted:
                conn.reset()
            else:
                _close_quietly(conn)


def _close_quietly(conn: _Conn) -> None:
    for w in (conn.client, conn.upstream):
        if w is not None and not w.transport.is_closing():
            w.close()
