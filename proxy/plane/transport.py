"""The data plane of a proxy worker: the running listeners of the current snapshot,
and how a new snapshot replaces them (``DataPlane.apply``).

Theory of operation
-------------------
``apply(snapshot)`` goes in three steps; the first two change nothing that runs, so
a snapshot that fails in either is rejected with the previous one fully in place:

1. **Prepare**: compile the snapshot (``proxy.runtime.compile_snapshot``, carrying
   rate-limit, breaker and outlier state over from the current one), build or reuse
   its TLS contexts (``proxy.dataplane.TlsMaterial``), open its access-log file.
2. **Bind**: start the listeners at addresses nobody of ours listens on yet
   (``proxy.dataplane.plan_listeners``): new outbound listeners, and the inbound
   port when it is new or moved. A port that cannot be bound closes what this step
   started and rejects the snapshot.
3. **Commit**: update the kept listeners in place (each swaps its runtime and
   contexts in one assignment: new connections use the new snapshot, open ones
   finish under the objects they started with, so a certificate rotation fails no
   connection), replace the listeners whose protocol changed, close the removed
   ones with their connections, and only then make the new ``Compiled`` current.

L4 listeners are ``proxy.l4``'s; ``http`` upstreams and services are served by
``proxy.l7`` (imported when first needed: a worker with only tcp services never
loads it). The inbound port is always an L4 listener; it hands connections to http
services to one ``proxy.l7.HttpInbound``.

Outlier detection runs on the loop's clock with one ``call_at`` handle at the current
snapshot's earliest due time (``Compiled.timer()``), re-armed after it fires, after
every snapshot, and by a one-second housekeeping tick (the data path records
outcomes between ticks, which can move a due time earlier: an ejection's return).
The tick also counts the detectors' ejection events into telemetry.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import sys
from collections.abc import Callable
from types import ModuleType
from typing import IO, Any, Final, Protocol

from proxy.dataplane import (
    Address,
    ListenerPlan,
    ProtocolName,
    SnapshotRejected,
    TlsMaterial,
    plan_listeners,
)
from proxy.l4 import InboundListener, OutboundListener
from proxy.resilience import EndpointEjected
from proxy.runtime import (
    Compiled,
    ForwardRuntime,
    InboundRuntime,
    UpstreamRuntime,
    compile_snapshot,
)
from proxy.snapshot import AccessLog, Snapshot
from proxy.telemetry import AccessLogger, Telemetry

log = logging.getLogger("proxy.plane")

#: Seconds between housekeeping ticks (outlier timers re-armed, ejections counted).
HOUSEKEEPING_INTERVAL: Final = 1.0


class OutboundServing(Protocol):
    """What the data plane needs of an outbound listener, L4 or L7."""

    async def start(self) -> None: ...

    def update(self, runtime: Any, contexts: Any) -> None: ...

    """``UpstreamRuntime`` (or ``ForwardRuntime`` for a forward proxy) and contexts."""

    def open_connections(self) -> int: ...

    async def aclose(self) -> None: ...


def load_l7() -> ModuleType | None:
    """``proxy.l7`` when it is importable (the L7 data path), else None."""
    try:
        return importlib.import_module("proxy.l7")
    except ImportError as exc:
        log.debug("l7_unavailable error=%s", exc)
        return None


class SwitchableAccessLog(AccessLogger):
    """The access logger every listener shares: a new snapshot's ``AccessLog`` (path,
    sample) is swapped in without touching the listeners (the L7 ones take the
    logger at construction only)."""

    def __init__(self, rng: random.Random, stdout: Callable[[str], None]) -> None:
        self._switch_rng = rng
        self._stdout = stdout
        self._spec = AccessLog(path="off")
        self._file: IO[str] | None = None
        super().__init__(self._spec, stdout, rng)

    def prepare(self, spec: AccessLog) -> IO[str] | None:
        """Open what ``spec`` writes to, when it is a new file (raises OSError)."""
        if spec.path in ("", "off") or spec.path == self._spec.path:
            return None
        return open(spec.path, "a", buffering=1, encoding="utf-8")

    def switch(self, spec: AccessLog, opened: IO[str] | None) -> None:
        """Write as ``spec`` says from now on (``opened``: from :meth:`prepare`)."""
        if spec.path in ("", "off") or opened is not None:
            if self._file is not None:
                self._file.close()
            self._file = opened
        if spec.path == "off":
            write: Callable[[str], None] = self._stdout
        elif spec.path == "":
            write = self._stdout
        else:
            assert self._file is not None
            write = self._file_writer(self._file)
        self._spec = spec
        AccessLogger.__init__(self, spec, write, self._switch_rng)

    @staticmethod
    def _file_writer(file: IO[str]) -> Callable[[str], None]:
        def write(line: str) -> None:
            file.write(line + "\n")

        return write

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def print_line(line: str) -> None:
    """Access-log lines on stdout, one flushed write each (line-buffered)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class DataPlane:
    """The listeners of the current snapshot. ``apply`` raises
    :class:`proxy.dataplane.SnapshotRejected` and changes nothing when a snapshot
    cannot be applied."""

    def __init__(
        self,
        telemetry: Telemetry | None = None,
        *,
        rng: random.Random | None = None,
        stdout: Callable[[str], None] = print_line,
        l7: ModuleType | bool | None = True,
    ) -> None:
        """``l7``: True to import ``proxy.l7`` when first needed, False for none, or
        the module itself."""
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._rng = rng or random.Random()
        self.access_log = SwitchableAccessLog(self._rng, stdout)
        self.compiled: Compiled | None = None
        self.inbound: InboundListener | None = None
        self.outbound: dict[Address, OutboundServing] = {}
        self._protocols: dict[Address, ProtocolName] = {}
        self._tls: TlsMaterial | None = None
        self._l7_choice = l7
        self._l7: ModuleType | None = None
        self._http_inbound: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._housekeeping: asyncio.TimerHandle | None = None
        self._closed = False
        self._applying = asyncio.Lock()

    # -------------------------------------------------------------------- snapshot

    @property
    def version(self) -> int | None:
        return self.compiled.snapshot.version if self.compiled is not None else None

    async def apply(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the one that serves (see the module docstring). One at a
        time: a second call waits for the first."""
        async with self._applying:
            await self._apply(snapshot)

    async def _apply(self, snapshot: Snapshot) -> None:
        if self._closed:
            raise SnapshotRejected("the data plane is closed")
        try:
            compiled = compile_snapshot(snapshot, self.compiled, self._rng)
            material = TlsMaterial.build(snapshot, self._tls, self._client_handshake_failed)
            opened_log = self.access_log.prepare(snapshot.access_log)
        except Exception as exc:  # any compile or PEM error rejects, the worker lives on
            raise SnapshotRejected(_describe(exc)) from exc
        inbound_address = self._configured_inbound()
        plan = plan_listeners(inbound_address, self._protocols, snapshot)
        try:
            l7 = self._l7_for(snapshot, plan)
            new_inbound, created = await self._bind(compiled, material, plan, l7)
        except Exception as exc:
            if opened_log is not None:
                opened_log.close()
            raise SnapshotRejected(_describe(exc)) from exc
        await self._commit(compiled, material, plan, l7, new_inbound, created)
        self.access_log.switch(snapshot.access_log, opened_log)
        self._count_ejections()  # the old snapshot's last events
        self.compiled = compiled
        self._tls = material
        self.telemetry.set_gauge("snapshot_version", (), snapshot.version)
        self._arm_timer()
        if self._housekeeping is None:
            self._housekeeping = asyncio.get_running_loop().call_later(
                HOUSEKEEPING_INTERVAL, self._housekeep
            )
        log.info("snapshot_applied version=%d", snapshot.version)

    def _configured_inbound(self) -> Address | None:
        if self.inbound is None or self.compiled is None or self.compiled.inbound is None:
            return None
        inbound = self.compiled.inbound.inbound
        return inbound.host, inbound.port

    def _l7_for(self, snapshot: Snapshot, plan: ListenerPlan) -> ModuleType | None:
        wants = (
            any(u.protocol == "http" for u in snapshot.upstreams)
            or bool(snapshot.forward_proxies)
            or (
                snapshot.inbound is not None
                and any(s.protocol == "http" for s in snapshot.inbound.services.values())
            )
        )
        if not wants:
            return self._l7
        if self._l7 is None:
            if self._l7_choice is True:
                self._l7 = load_l7()
            elif isinstance(self._l7_choice, ModuleType):
                self._l7 = self._l7_choice
        if self._l7 is None and (
            any(u.protocol == "http" for u in snapshot.upstreams) or snapshot.forward_proxies
        ):
            raise SnapshotRejected("http upstreams need the L7 data path (proxy.l7)")
        return self._l7

    async def _bind(
        self, compiled: Compiled, material: TlsMaterial, plan: ListenerPlan, l7: ModuleType | None
    ) -> tuple[InboundListener | None, dict[Address, OutboundServing]]:
        """Start the listeners at new addresses; on failure, close them and raise."""
        started: list[InboundListener | OutboundServing] = []
        new_inbound: InboundListener | None = None
        created: dict[Address, OutboundServing] = {}
        try:
            if plan.inbound in ("create", "rebind"):
                assert compiled.inbound is not None
                new_inbound = self._inbound_listener(
                    compiled.inbound, material, compiled.snapshot.trust_bundle, l7
                )
                await new_inbound.start()
                started.append(new_inbound)
            for address in plan.create:
                listener = self._outbound_listener(compiled, material, address, l7)
                await listener.start()
                started.append(listener)
                created[address] = listener
        except BaseException:
            for running in started:
                await running.aclose()
            raise
        return new_inbound, created

    async def _commit(
        self,
        compiled: Compiled,
        material: TlsMaterial,
        plan: ListenerPlan,
        l7: ModuleType | None,
        new_inbound: InboundListener | None,
        created: dict[Address, OutboundServing],
    ) -> None:
        # The L7 inbound handler follows the inbound runtime.
        if compiled.inbound is not None and l7 is not None:
            if self._http_inbound is None:
                self._http_inbound = l7.HttpInbound(
                    compiled.inbound, self.telemetry, self.access_log, rng=self._rng
                )
            else:
                self._http_inbound.update(compiled.inbound)
        if compiled.inbound is None and self._http_inbound is not None:
            http, self._http_inbound = self._http_inbound, None
            await http.aclose()  # before the inbound listener that accepted them
        old_inbound = self.inbound
        if plan.inbound == "update":
            assert old_inbound is not None and compiled.inbound is not None
            old_inbound.http = self._http_inbound
            old_inbound.update(compiled.inbound, material.sni)
        elif plan.inbound in ("rebind", "close") and old_inbound is not None:
            self.inbound = None
            await old_inbound.aclose(drain=plan.inbound == "rebind")
        if new_inbound is not None:
            self.inbound = new_inbound
        for address in plan.update:
            self.outbound[address].update(*self._runtime_of(compiled, material, address))
        for address in plan.close:
            listener = self.outbound.pop(address)
            self._protocols.pop(address, None)
            await listener.aclose()
        for address in plan.replace:
            await self.outbound.pop(address).aclose()
            listener = self._outbound_listener(compiled, material, address, l7)
            try:
                await listener.start()
            except OSError as exc:  # the port was ours a moment ago: rare
                log.error("listener_replace_failed address=%s error=%s", address, exc)
                self._protocols.pop(address, None)
                continue
            created[address] = listener
        for address, listener in created.items():
            self.outbound[address] = listener
        self._protocols = {
            address: protocol
            for address, protocol in plan.wanted.items()
            if address in self.outbound
        }

    def _inbound_listener(
        self,
        runtime: InboundRuntime,
        material: TlsMaterial,
        trust_bundle: tuple[str, ...],
        l7: ModuleType | None,
    ) -> InboundListener:
        if l7 is not None and self._http_inbound is None:
            self._http_inbound = l7.HttpInbound(
                runtime, self.telemetry, self.access_log, rng=self._rng
            )
        return InboundListener(
            runtime,
            material.sni,
            trust_bundle,
            self.telemetry,
            self.access_log,
            http=self._http_inbound,
        )

    @staticmethod
    def _runtime_of(
        compiled: Compiled, material: TlsMaterial, address: Address
    ) -> tuple[UpstreamRuntime | ForwardRuntime, Any]:
        """What ``update()`` of the listener at ``address`` takes."""
        forward = compiled.forwards.get(address)
        if forward is not None:
            return forward, material.upstreams.get(address)
        return compiled.upstreams[address], material.upstreams[address]

    def _outbound_listener(
        self, compiled: Compiled, material: TlsMaterial, address: Address, l7: ModuleType | None
    ) -> OutboundServing:
        runtime, contexts = self._runtime_of(compiled, material, address)
        if isinstance(runtime, ForwardRuntime):
            assert l7 is not None
            forward: OutboundServing = l7.HttpForwardListener(
                runtime, contexts, self.telemetry, self.access_log, rng=self._rng
            )
            return forward
        if runtime.upstream.protocol == "http":
            assert l7 is not None
            listener: OutboundServing = l7.HttpOutboundListener(
                runtime, contexts, self.telemetry, self.access_log, rng=self._rng
            )
            return listener
        return OutboundListener(runtime, contexts, self.telemetry, self.access_log, rng=self._rng)

    def _client_handshake_failed(self, reason: str) -> None:
        self.telemetry.handshake_failure("outbound", reason)

    # ------------------------------------------------------------------ timers

    def _arm_timer(self) -> None:
        """One ``call_at`` at the current snapshot's earliest outlier due time."""
        self._count_ejections()
        due = self.compiled.timer() if self.compiled is not None else None
        if self._timer is not None:
            if due is not None and self._timer_due == due:
                return
            self._timer.cancel()
            self._timer = None
        if due is not None and not self._closed:
            self._timer = asyncio.get_running_loop().call_at(due, self._fire)
            self._timer_due = due

    def _fire(self) -> None:
        self._timer = None
        if self.compiled is not None:
            self.compiled.handle_timer(asyncio.get_running_loop().time())
        self._arm_timer()

    def _count_ejections(self) -> None:
        """Ejections into telemetry. Events are pulled from the current snapshot only
        (a detector is shared with the next snapshot's cluster of the same name)."""
        if self.compiled is None:
            return
        for upstream, cluster, event in self.compiled.take_events():
            if isinstance(event, EndpointEjected):
                name = cluster.cluster.name
                self.telemetry.ejection(upstream.upstream.destination, name)
                endpoint = event.endpoint
                log.info(
                    "endpoint_ejected cluster=%s endpoint=%s:%d reason=%s",
                    name,
                    endpoint.host,
                    endpoint.port,
                    event.reason,
                )

    def _housekeep(self) -> None:
        self._housekeeping = None
        if self._closed:
            return
        self._arm_timer()
        self._housekeeping = asyncio.get_running_loop().call_later(
            HOUSEKEEPING_INTERVAL, self._housekeep
        )

    # ------------------------------------------------------------------ the end

    def open_connections(self) -> int:
        count = sum(listener.open_connections() for listener in self.outbound.values())
        if self.inbound is not None:
            count += self.inbound.open_connections()
        if self._http_inbound is not None:
            count += int(self._http_inbound.open_connections())
        return count

    async def aclose(self) -> None:
        """Stop accepting, close every connection and timer."""
        self._closed = True
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._http_inbound is not None:  # first: its connections came from inbound
            await self._http_inbound.aclose()
            self._http_inbound = None
        if self.inbound is not None:
            await self.inbound.aclose()
            self.inbound = None
        for listener in self.outbound.values():
            await listener.aclose()
        self.outbound.clear()
        self._protocols.clear()
        self.access_log.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
