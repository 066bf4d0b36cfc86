"""The service manager's readiness protocol, sd_notify(3), without libsystemd.

Theory of operation
-------------------
systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` naming an AF_UNIX
datagram socket: a path (``/run/systemd/notify``) or, when it starts with ``@``, an
abstract socket (``@`` stands for the leading NUL byte). The service reports its state
by sending one datagram of newline-separated ``KEY=VALUE`` assignments there
(``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=…``, ``WATCHDOG=1``); systemd
identifies the sender from the socket credentials, which is why ``NotifyAccess=main``
works with no handshake. Without ``$NOTIFY_SOCKET`` (a terminal, Nomad, a test) every
call is a no-op that returns False, so callers never need to ask first.

The protocol is small and stable (the wire format is documented in sd_notify(3) and
systemd's "Notify socket" interface docs), so a dozen lines of stdlib beat a
dependency on libsystemd or a binding.

``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` are read here rather than
in ``meshnode/config.py`` (STYLE.md rule 6) because they are not settings: the service
manager sets them for this one process, and they mean nothing to anyone else.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping
from typing import Final

#: Upper bound on one notification. systemd reads notifications into a PIPE_BUF-sized
#: (4096-byte) buffer and ignores longer datagrams, so refusing here turns a silent
#: loss into a visible False.
MAX_MESSAGE_BYTES: Final = 4096


def _socket_address(environ: Mapping[str, str]) -> str | None:
    """The AF_UNIX address in ``$NOTIFY_SOCKET``, or None if there is none we can use."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # Linux abstract namespace: the name is the rest, after a NUL byte.
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # Empty (not under systemd) or a transport we do not speak (``vsock:…``,
    # systemd ≥ 253 inside VMs): sd_notify(3) also refuses those.
    return None


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to the service manager.

    True if the datagram was sent; False when not running under a service manager, or
    when sending failed. A lost notification must never take the agent down: if it
    matters, systemd's own timeouts (``TimeoutStartSec``, ``WatchdogSec``) report it.
    """
    address = _socket_address(os.environ if environ is None else environ)
    if address is None:
        return False
    message = state.encode()
    if len(message) > MAX_MESSAGE_BYTES:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def ready(*, environ: Mapping[str, str] | None = None) -> bool:
    """Start-up (or a reload) is complete: ``systemctl start`` returns now."""
    return notify("READY=1", environ=environ)


def reloading(*, environ: Mapping[str, str] | None = None) -> bool:
    """A reload has begun; follow with ``ready()`` when it is over, failed or not.

    ``Type=notify-reload`` (systemd ≥ 253) requires ``MONOTONIC_USEC``, the
    CLOCK_MONOTONIC time at which the reload began, so the manager can tell this
    reload from an earlier one; older versions ignore the extra field.
    """
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={now_usec}", environ=environ)


def stopping(*, environ: Mapping[str, str] | None = None) -> bool:
    """Shutdown has begun (a leave takes a few seconds: show it as deactivating)."""
    return notify("STOPPING=1", environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """A one-line status for ``systemctl status``."""
    # A newline would start a new assignment that systemd would try to parse.
    one_line = " ".join(text.splitlines())
    return notify(f"STATUS={one_line}", environ=environ)


def watchdog(*, environ: Mapping[str, str] | None = None) -> bool:
    """Tell the manager we are alive (``WatchdogSec=``)."""
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval(*, environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds if the manager expects pings from us, else None.

    Same rules as sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is a positive integer, and
    ``$WATCHDOG_PID``, when set, must be our PID (a child that inherited the variables
    must not ping for us). Ping at least twice per interval.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


async def keep_watchdog_alive(interval: float, *, environ: Mapping[str, str] | None = None) -> None:
    """Ping the watchdog every ``interval / 2`` seconds until cancelled.

    Run on the agent's event loop, so the pings stop when the loop is blocked, which
    is the failure the watchdog is for: a blocked loop misses gossip probes and peers
    declare this node dead, so a restart is the better outcome. Half the interval, as
    sd_watchdog_enabled(3) recommends, leaves room for one late wake-up.
    """
    while True:
        watchdog(environ=environ)
        await asyncio.sleep(interval / 2)


__all__ = [
    "keep_watchdog_alive",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]
