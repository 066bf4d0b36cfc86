"""A proxy worker process: ``python -m proxy --control PATH`` (fed by its agent) or
``python -m proxy --snapshot FILE`` (one snapshot from a file: tests, benchmarks).

Theory of operation
-------------------
The worker is the proxy's process (DESIGN.md: the data path runs apart from the
agent's control loop). Its whole configuration is a ``proxy.snapshot.Snapshot``; the
data plane (``proxy.plane.DataPlane``) compiles each one and swaps it in atomically
without dropping open connections.

**Control socket.** The agent listens on a unix stream socket
(``<data_dir>/proxy.sock``); the worker connects. Frames are a 4-byte big-endian
length, then a msgpack array ``[kind, body]``, at most 64 MiB
(:func:`encode_frame`, :class:`FrameDecoder` — both pure, the agent may use them):

* worker → agent, first: ``["hello", {"pid": int, "protocol": 1}]``;
* agent → worker: ``["snapshot", <bytes of proxy.snapshot.encode(snapshot)>]``,
  after hello and after every change;
* worker → agent: ``["applied", version]`` or ``["rejected", version or -1, error]``
  (the previous snapshot keeps serving);
* worker → agent, every second: ``["stats", proxy.telemetry.Telemetry.dump()]``.

When the control connection drops, the worker keeps serving its last snapshot and
reconnects every second; with ``--exit-with-agent`` it exits 0 instead (the agent's
supervised worker: a new agent starts a new worker). A frame that does not decode
closes the connection (the agent is trusted but a codec bug must not spin).

It prints one line ``ready`` on stdout once the listeners of its first snapshot
accept. On SIGTERM or SIGINT it stops accepting, closes every connection and exits 0.
Access-log lines (``AccessLog.path`` "") also go to stdout, after ``ready``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import platform
import signal
import struct
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import msgpack

from proxy.dataplane import SnapshotRejected
from proxy.plane import DataPlane
from proxy.snapshot import MAX_SNAPSHOT_BYTES, SnapshotError, decode
from proxy.unixpath import reachable_unix_path

log = logging.getLogger("proxy.worker")

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = MAX_SNAPSHOT_BYTES
"""A frame carries at most one snapshot (plus a few bytes of framing)."""
_FRAME_OVERHEAD: Final = 64
STATS_INTERVAL: Final = 1.0
RECONNECT_INTERVAL: Final = 1.0
_LENGTH: Final = struct.Struct(">I")


class ControlProtocolError(ValueError):
    """A frame on the control socket that is not ``[kind, body]`` msgpack."""


def encode_frame(kind: str, *body: Any) -> bytes:
    """One control frame: the length, then msgpack ``[kind, *body]``."""
    payload: bytes = msgpack.packb([kind, *body], use_bin_type=True)
    if len(payload) > MAX_FRAME_BYTES + _FRAME_OVERHEAD:
        raise ControlProtocolError(f"a {kind} frame of {len(payload)} bytes is too big")
    return _LENGTH.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> list[Any]:
    """``[kind, ...]`` from a frame's payload."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ControlProtocolError(f"not msgpack: {exc}") from None
    if not (isinstance(message, list) and message and isinstance(message[0], str)):
        raise ControlProtocolError("a frame is an array [kind, body...]")
    return message


class FrameDecoder:
    """Bytes in, messages out (for a caller that reads chunks, not frames)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES + _FRAME_OVERHEAD:
                raise ControlProtocolError(f"a frame of {length} bytes is too big")
            if len(self._buffer) < _LENGTH.size + length:
                break
            payload = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            messages.append(decode_payload(payload))
        return messages


async def read_frame(reader: asyncio.StreamReader) -> list[Any]:
    """The next message; ``asyncio.IncompleteReadError`` at EOF."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME_BYTES + _FRAME_OVERHEAD:
        raise ControlProtocolError(f"a frame of {length} bytes is too big")
    return decode_payload(await reader.readexactly(length))


# ---------------------------------------------------------------------------- the worker


class Worker:
    """One worker: a data plane, fed from a control socket or a file."""

    def __init__(self, plane: DataPlane, ready: Callable[[], None]) -> None:
        self.plane = plane
        self._ready = ready
        self._announced = False
        self.stop = asyncio.Event()

    async def apply(self, data: bytes) -> tuple[int, str | None]:
        """Decode and apply a snapshot: (version, None) or (version or -1, error)."""
        try:
            snapshot = decode(data)
        except SnapshotError as exc:
            return -1, str(exc)
        except Exception as exc:  # a codec bug must not end the worker: reject instead
            log.exception("snapshot_decode_failed")
            return -1, f"{type(exc).__name__}: {exc}"
        try:
            await self.plane.apply(snapshot)
        except SnapshotRejected as exc:
            log.warning("snapshot_rejected version=%d error=%s", snapshot.version, exc)
            return snapshot.version, str(exc)
        if not self._announced:
            self._announced = True
            self._ready()
        return snapshot.version, None

    # ------------------------------------------------------------------ control

    async def run_control(self, path: str, exit_with_agent: bool) -> None:
        """Talk to the agent until stopped (or, with ``exit_with_agent``, until the
        connection is lost); reconnect every second meanwhile."""
        first = True
        while not self.stop.is_set():
            try:
                with reachable_unix_path(path) as reachable:
                    reader, writer = await asyncio.open_unix_connection(reachable)
            except OSError as exc:
                if exit_with_agent:
                    log.error("control_connect_failed path=%s error=%s", path, exc)
                    if first:
                        raise
                    return
                log.info("control_connect_failed path=%s error=%s", path, exc)
                await self._sleep(RECONNECT_INTERVAL)
                continue
            first = False
            try:
                await self._session(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ControlProtocolError) as exc:
                log.warning("control_connection_lost error=%s", exc or type(exc).__name__)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if exit_with_agent:
                return
            await self._sleep(RECONNECT_INTERVAL)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stop.wait()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode_frame("hello", {"pid": os.getpid(), "protocol": PROTOCOL_VERSION}))
        await writer.drain()
        stats = asyncio.get_running_loop().create_task(self._send_stats(writer))
        try:
            while True:
                message = await read_frame(reader)
                if message[0] != "snapshot":
                    log.info("control_message_ignored kind=%s", message[0])
                    continue
                if len(message) != 2 or not isinstance(message[1], bytes):
                    writer.write(encode_frame("rejected", -1, "a snapshot frame carries bytes"))
                    continue
                version, error = await self.apply(message[1])
                if error is None:
                    writer.write(encode_frame("applied", version))
                else:
                    writer.write(encode_frame("rejected", version, error))
                await writer.drain()
        finally:
            stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats

    async def _send_stats(self, writer: asyncio.StreamWriter) -> None:
        telemetry = self.plane.telemetry
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            if writer.is_closing():
                return
            telemetry.set_gauge("open_connections", (), self.plane.open_connections())
            writer.write(encode_frame("stats", telemetry.dump()))


async def serve(options: argparse.Namespace, ready: Callable[[], None] = lambda: None) -> int:
    """Run the worker until SIGTERM/SIGINT (or the agent leaves, with
    ``--exit-with-agent``); the exit status."""
    loop = asyncio.get_running_loop()
    plane = DataPlane()
    worker = Worker(plane, ready)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop.set)
    status = 0
    try:
        if options.snapshot is not None:
            _, error = await worker.apply(options.snapshot.read_bytes())
            if error is not None:
                print(f"python -m proxy: {options.snapshot}: {error}", file=sys.stderr)
                return 2
            await worker.stop.wait()
        else:
            control = loop.create_task(worker.run_control(options.control, options.exit_with_agent))
            stopped = loop.create_task(worker.stop.wait())
            done, _ = await asyncio.wait({control, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (control, stopped):
                task.cancel()
            if control in done and control.exception() is not None:
                print(f"python -m proxy: {options.control}: {control.exception()}", file=sys.stderr)
                status = 1
    finally:
        await plane.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return status


#: glibc's ``mallopt`` parameters (malloc.h) and the values the worker sets.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 1 << 20
TRIM_THRESHOLD: Final = 8 << 20


def tune_allocator() -> bool:
    """Serve the TLS read buffers from the heap, not from fresh ``mmap`` s.

    uvloop's TLS transport reads decrypted bytes for a ``Protocol`` with
    ``SSLObject.read(256 KiB)``: a 256 KiB ``bytes`` is allocated, filled with the
    few bytes a record holds, shrunk and freed, once per read. glibc serves
    allocations above its mmap threshold (128 KiB, raised only by freeing a larger
    *unshrunk* mmap'd block) with ``mmap``, shrinks them with ``mremap`` and frees
    them with ``munmap`` — three system calls, a page fault and a TLB flush per
    read. Whether a worker paid that depended on its allocation history: perf
    (``-e cpu-clock``) on the L4 benchmark pair found it in one worker of the pair
    and not the other, 21 % of that worker's CPU (about 25 µs per request). A fixed
    1 MiB threshold makes every such buffer a heap block (reused, no system call);
    the trim threshold keeps up to 8 MiB of freed heap instead of returning it to
    the kernel after each request. Returns whether the allocator was tuned
    (glibc only; elsewhere this is a no-op)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first (setting it disables the
    # dynamic adjustment of both thresholds), then the trim threshold.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def _run(main: Coroutine[Any, Any, int], event_loop: str = "auto") -> int:
    """Under uvloop when it is installed (extra ``speed``) and not refused, else
    asyncio's loop. ``--event-loop asyncio`` exists because uvloop's TLS has open
    memory-growth issues (MagicStack/uvloop#565): compare both in ``bench/proxy.py``."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise
        else:
            result: int = uvloop.run(main)
            return result
    return asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--control", help="the agent's unix socket (<data_dir>/proxy.sock)")
    source.add_argument(
        "--snapshot", type=Path, help="a file holding proxy.snapshot.encode(snapshot)"
    )
    parser.add_argument(
        "--exit-with-agent",
        action="store_true",
        help="exit 0 when the control connection is lost instead of reconnecting",
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="uvloop when installed (auto), or force one",
    )
    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s"
    )
    if options.snapshot is not None and not options.snapshot.is_file():
        print(f"python -m proxy: {options.snapshot}: no such file", file=sys.stderr)
        return 2

    def ready() -> None:
        print("ready", flush=True)

    tune_allocator()
    status = 0
    with contextlib.suppress(KeyboardInterrupt):
        status = _run(serve(options, ready), options.event_loop)
    return status
