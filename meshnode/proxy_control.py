"""The agent's side of the proxy: the control socket its worker connects to, and the
supervisor that keeps a worker running.

Theory of operation
-------------------
The data path runs in a separate process (DESIGN.md principle 3) that knows nothing
but its snapshot. The agent listens on a unix socket, ``<data_dir>/proxy.sock``
(mode 0600: whoever can connect is given private keys), and speaks the control
protocol of issue 5 with every worker that connects: frames of a 4-byte big-endian
length and a msgpack array ``[kind, body...]``, at most 64 MiB:

* worker → agent, first: ``["hello", {"pid": int, "protocol": 1}]``;
* agent → worker: ``["snapshot", <proxy.snapshot.encode(...) bytes>]`` right after
  the hello and after every change;
* worker → agent: ``["applied", version]``, ``["rejected", version, "error"]``, and
  every second ``["stats", proxy.telemetry.Telemetry.dump()]``.

Snapshots. The agent calls :meth:`ProxyControl.changed` on anything that may affect
the snapshot (catalog, policy, leaves, trust bundle, members' proxy ports). Changes
are coalesced: the first one arms a timer of :data:`DEBOUNCE` seconds, the others
ride along, and when it fires the snapshot is rebuilt (``build``, a pure function:
``meshnode.sidecar``) and compared with the last one *without its version*; only a
different snapshot gets the next version and is pushed. So a burst of catalog writes
costs one build and one push, within ~DEBOUNCE of the first, and the many changes
that do not concern the proxy (a check's output, another node's unrelated service)
cost a build and no push.

Worker supervision (:class:`WorkerSupervisor`). With ``proxy.managed`` the agent runs
``python -m proxy --control <socket> --exit-with-agent`` from the first snapshot that
has a listener on (an agent with nothing to proxy runs no worker), with stdout and stderr
inherited (the worker's ``ready`` line and access log go where the agent's output
goes). When it exits it is started again after a backoff of 0.1 s doubling to 5 s,
reset once a worker has lived 30 s, so a worker that crashes at start does not spin
while a long-lived one that dies is back at once. At shutdown the worker gets SIGTERM,
then SIGKILL after 5 s, by PID. ``--exit-with-agent`` makes a worker whose agent died
(the control connection closed) exit too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import msgpack
import structlog

from proxy.snapshot import MAX_SNAPSHOT_BYTES, Snapshot, encode
from proxy.unixpath import reachable_unix_path

log = structlog.get_logger()

SOCKET_NAME: Final = "proxy.sock"
PROTOCOL_VERSION: Final = 1
#: Largest control frame either side accepts (a snapshot plus framing).
MAX_FRAME_BYTES: Final = MAX_SNAPSHOT_BYTES
#: Changes within this long of the first are pushed together (issue 5: a change is
#: pushed within 100 ms; a build takes a few ms for hundreds of instances).
DEBOUNCE: Final = 0.03
#: A worker that does not say hello this soon after connecting is dropped.
HELLO_TIMEOUT: Final = 5.0
#: A worker whose unread snapshots pile up beyond this is dropped (it reconnects).
MAX_WRITE_BUFFER: Final = 4 * MAX_SNAPSHOT_BYTES
RESTART_BACKOFF_MIN: Final = 0.1
RESTART_BACKOFF_MAX: Final = 5.0
#: A worker alive this long had a good run: the next restart is immediate again.
RESTART_RESET_AFTER: Final = 30.0
#: SIGTERM, then this long, then SIGKILL.
STOP_TIMEOUT: Final = 5.0

_LENGTH: Final = struct.Struct(">I")


class ControlProtocolError(ValueError):
    """A worker sent something that is not the control protocol."""


def encode_frame(kind: str, *body: object) -> bytes:
    """One control frame: length, then msgpack ``[kind, *body]``."""
    payload: bytes = msgpack.packb([kind, *body], use_bin_type=True)
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"{kind} frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> list[Any]:
    """The next frame's ``[kind, *body]``; ``asyncio.IncompleteReadError`` at EOF,
    :class:`ControlProtocolError` for garbage."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise ControlProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    payload = await reader.readexactly(length)
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ControlProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ControlProtocolError("a frame is [kind, body...]")
    return message


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """What the agent knows about its proxy, for metrics and the API."""

    snapshot_version: int
    """The version of the latest snapshot built (and pushed)."""
    applied_version: int
    """The latest version a worker reported applied; 0: none yet."""
    snapshots_rejected: int
    last_rejection: str
    worker_restarts: int
    workers_connected: int
    worker_pid: int | None
    """The supervised worker's PID (None when unmanaged or between restarts)."""
    dump: Mapping[str, Any] | None
    """The latest ``Telemetry.dump()`` a worker sent; None before the first."""


class _Worker:
    """One connected worker."""

    def __init__(self, writer: asyncio.StreamWriter, pid: int) -> None:
        self.writer = writer
        self.pid = pid

    def send(self, frame: bytes) -> bool:
        """Queue ``frame``; False (and the connection closed) if the worker stopped
        reading long ago."""
        transport = self.writer.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("proxy_worker_not_reading", pid=self.pid)
            transport.abort()
            return False
        self.writer.write(frame)
        return True


class ProxyControl:
    """The control socket and the current snapshot (see the module docstring).

    ``build()`` returns the current snapshot (its version is ignored: this object
    numbers them). ``worker_command``, if given, is run and supervised (see
    :class:`WorkerSupervisor`); None: the operator runs ``meshnode proxy``.
    """

    def __init__(
        self,
        socket_path: Path,
        build: Callable[[], Snapshot],
        *,
        worker_command: Sequence[str] | None = None,
        debounce: float = DEBOUNCE,
        restart_backoff: tuple[float, float] = (RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX),
        restart_reset_after: float = RESTART_RESET_AFTER,
        start_worker_when_needed: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self._when_needed = start_worker_when_needed
        self._build = build
        self._debounce = debounce
        self._server: asyncio.Server | None = None
        self._workers: set[_Worker] = set()
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._pending: asyncio.TimerHandle | None = None
        self._unversioned = b""
        self._version = 0
        self._snapshot: Snapshot | None = None
        self._frame = b""
        self._applied = 0
        self._rejected = 0
        self._last_rejection = ""
        self._dump: Mapping[str, Any] | None = None
        self._changed = asyncio.Condition()
        self.supervisor = (
            WorkerSupervisor(
                worker_command,
                backoff=restart_backoff,
                reset_after=restart_reset_after,
            )
            if worker_command is not None
            else None
        )
        self._supervisor_task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build the first snapshot, listen, and start the worker (if managed)."""
        path = self.socket_path
        self._rebuild()
        with contextlib.suppress(FileNotFoundError):
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                raise ValueError(f"{path} is a directory")
            path.unlink()  # stale: the data_dir lock says no other agent runs here
        # A data dir deeper than a unix socket address allows is reached through a
        # descriptor of it (the worker connects the same way).
        with reachable_unix_path(path) as reachable:
            self._server = await asyncio.start_unix_server(
                self._serve, path=reachable, limit=MAX_FRAME_BYTES + _LENGTH.size
            )
        os.chmod(path, 0o600)
        log.info("proxy_control_listening", socket=str(path), version=self._version)
        self._start_worker_if_needed()

    def _start_worker_if_needed(self) -> None:
        """Start the supervised worker, once: at once, or (``start_worker_when_needed``)
        with the first snapshot that has a listener — an agent with no service to
        proxy, the common case of test clusters and benchmarks, runs no worker."""
        if self.supervisor is None or self._supervisor_task is not None or self._server is None:
            return
        snapshot = self._snapshot
        if self._when_needed and (
            snapshot is None or (snapshot.inbound is None and not snapshot.upstreams)
        ):
            return
        self._supervisor_task = asyncio.get_running_loop().create_task(self.supervisor.run())

    async def aclose(self) -> None:
        """Stop the worker, close every connection, remove the socket."""
        self._closed = True
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._supervisor_task is not None:
            self._supervisor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor_task
            self._supervisor_task = None
        if self._server is not None:
            self._server.close()
            self._server = None
        # Closing the connections ends their handlers (EOF); cancelling them instead
        # would make asyncio's stream callback log the CancelledError.
        for writer in list(self._connections.values()):
            writer.transport.abort()
        handlers = list(self._connections)
        if handlers:
            await asyncio.wait(handlers, timeout=1.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def stopping(self) -> None:
        """The agent is shutting down: a worker that exits now (a Ctrl-C reaches the
        whole process group) is not restarted."""
        if self.supervisor is not None:
            self.supervisor.stopping = True

    # ------------------------------------------------------------------ snapshots

    def changed(self) -> None:
        """Something the snapshot may depend on changed: rebuild and push soon."""
        if self._pending is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._pending = loop.call_later(self._debounce, self._rebuild_and_push)

    def rebuild_now(self) -> None:
        """Rebuild and push at once (tests; the agent uses :meth:`changed`)."""
        if self._pending is not None:
            self._pending.cancel()
        self._rebuild_and_push()

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot built (what a connecting worker gets)."""
        return self._snapshot

    def _rebuild_and_push(self) -> None:
        self._pending = None
        if self._rebuild():
            for worker in list(self._workers):
                if not worker.send(self._frame):
                    self._workers.discard(worker)
            self._start_worker_if_needed()

    def _rebuild(self) -> bool:
        """Build; True if the snapshot changed (and got a new version)."""
        try:
            snapshot = replace(self._build(), version=0)
            unversioned = encode(snapshot)
        except Exception:  # a builder bug must not take the agent down
            log.exception("proxy_snapshot_build_failed")
            return False
        if unversioned == self._unversioned and self._snapshot is not None:
            return False
        self._unversioned = unversioned
        self._version += 1
        self._snapshot = replace(snapshot, version=self._version)
        self._frame = encode_frame("snapshot", encode(self._snapshot))
        log.debug("proxy_snapshot_built", version=self._version, bytes=len(self._frame))
        return True

    # ------------------------------------------------------------------ workers

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        worker: _Worker | None = None
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                hello = await read_frame(reader)
            worker = self._hello(hello, writer)
            self._workers.add(worker)
            log.info("proxy_worker_connected", pid=worker.pid, version=self._version)
            worker.send(self._frame)
            while True:
                self._receive(worker, await read_frame(reader))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except ControlProtocolError as exc:
            log.warning(
                "proxy_worker_protocol_error", pid=worker.pid if worker else None, error=str(exc)
            )
        finally:
            self._connections.pop(task, None)
            if worker is not None:
                self._workers.discard(worker)
                log.info("proxy_worker_disconnected", pid=worker.pid)
            writer.transport.abort()

    def _hello(self, message: list[Any], writer: asyncio.StreamWriter) -> _Worker:
        body = message[1] if len(message) > 1 else None
        if message[0] != "hello" or not isinstance(body, dict):
            raise ControlProtocolError("the first frame must be hello")
        if body.get("protocol") != PROTOCOL_VERSION:
            raise ControlProtocolError(f"unsupported protocol {body.get('protocol')!r}")
        pid = body.get("pid")
        return _Worker(writer, pid if isinstance(pid, int) else 0)

    def _receive(self, worker: _Worker, message: list[Any]) -> None:
        kind = message[0]
        if kind == "applied" and len(message) >= 2 and isinstance(message[1], int):
            self._applied = message[1]
            log.debug("proxy_snapshot_applied", pid=worker.pid, version=message[1])
            self._notify()
        elif kind == "rejected" and len(message) >= 2:
            self._rejected += 1
            self._last_rejection = str(message[2]) if len(message) > 2 else ""
            log.error(
                "proxy_snapshot_rejected",
                pid=worker.pid,
                version=message[1],
                error=self._last_rejection,
            )
            self._notify()
        elif kind == "stats" and len(message) >= 2 and isinstance(message[1], dict):
            self._dump = message[1]
            self._notify()
        else:
            raise ControlProtocolError(f"unexpected {kind!r} frame")

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    async def wait_for(self, predicate: Callable[[ProxyStats], bool]) -> ProxyStats:
        """Wait until ``predicate(stats())`` holds (callers bound it with a timeout)."""
        async with self._changed:
            while True:
                stats = self.stats()
                if predicate(stats):
                    return stats
                await self._changed.wait()

    def stats(self) -> ProxyStats:
        supervisor = self.supervisor
        return ProxyStats(
            snapshot_version=self._version,
            applied_version=self._applied,
            snapshots_rejected=self._rejected,
            last_rejection=self._last_rejection,
            worker_restarts=supervisor.restarts if supervisor is not None else 0,
            workers_connected=len(self._workers),
            worker_pid=supervisor.stats_pid() if supervisor is not None else None,
            dump=self._dump,
        )


class WorkerSupervisor:
    """Runs ``command`` until cancelled, restarting it when it exits (see the module
    docstring for the backoff). Cancelling :meth:`run` stops the worker."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        backoff: tuple[float, float] = (RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX),
        reset_after: float = RESTART_RESET_AFTER,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.command = tuple(command)
        self._backoff_min, self._backoff_max = backoff
        self._reset_after = reset_after
        self._stop_timeout = stop_timeout
        self.restarts = 0
        self.pid: int | None = None
        self.stopping = False
        """Set at shutdown: do not restart a worker that exits."""

    def stats_pid(self) -> int | None:
        """The running worker's PID (None between runs)."""
        return self.pid

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff_min
        while True:
            started = loop.time()
            try:
                process = await asyncio.create_subprocess_exec(*self.command)
            except OSError as exc:
                log.error("proxy_worker_not_started", command=self.command[0], error=str(exc))
                code: int | None = None
            else:
                self.pid = process.pid
                log.info("proxy_worker_started", pid=process.pid)
                try:
                    code = await process.wait()
                finally:
                    if process.returncode is None:
                        await self._stop(process)
                    self.pid = None
            lived = loop.time() - started
            if self.stopping:
                log.info("proxy_worker_exited", code=code, lived=round(lived, 3))
                return
            if lived >= self._reset_after:
                delay = self._backoff_min
            log.warning("proxy_worker_exited", code=code, lived=round(lived, 3), restart_in=delay)
            await asyncio.sleep(delay)
            self.restarts += 1
            delay = min(self._backoff_max, delay * 2)

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM, then SIGKILL after the stop timeout (this process's PID only)."""
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), self._stop_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        log.info("proxy_worker_stopped", pid=process.pid, code=process.returncode)


def worker_command(
    socket_path: Path, *, event_loop: str = "auto", python: str | None = None
) -> list[str]:
    """The managed worker's command line (``python -m proxy --control ...``)."""
    import sys

    command = [python or sys.executable, "-m", "proxy", "--control", str(socket_path)]
    command.append("--exit-with-agent")
    if event_loop != "auto":
        command += ["--event-loop", event_loop]
    return command


__all__ = [
    "SOCKET_NAME",
    "ControlProtocolError",
    "ProxyControl",
    "ProxyStats",
    "WorkerSupervisor",
    "encode_frame",
    "read_frame",
    "worker_command",
]
