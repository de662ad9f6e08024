"""A TCP proxy the tests can cut and restore: a network partition between two real processes."""

from __future__ import annotations

import asyncio
import threading


class TcpProxy:
    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port, self.target_port = listen_port, target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        # Bytes that, once a client has sent them, drop its connection before the answer
        # comes back (a connection lost with a command committed).
        self.cut_after: bytes | None = None

    def __enter__(self) -> "TcpProxy":
        self.thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(5)

    def restore(self) -> None:
        """Accept connections again."""
        async def start() -> None:
            self.server = await asyncio.start_server(self._client, "127.0.0.1", self.listen_port)
        self._run(start())

    def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for writer in list(self.writers):
                writer.transport.abort()
            self.writers.clear()
        self._run(stop())

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    if src is reader and self.cut_after is not None and self.cut_after in data:
                        self.cut_after = None  # once: the command is on its way, its answer never returns
                        writer.transport.abort()
                        await asyncio.sleep(0.2)  # (the server runs it meanwhile)
                        up_writer.transport.abort()
                        return
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers.difference_update((writer, up_writer))
