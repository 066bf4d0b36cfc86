"""The HTTP forward-proxy listener: one loopback port for all of a service's upstreams,
the upstream chosen per request by its host.

An application configured with ``HTTP_PROXY=http://127.0.0.1:<http_proxy_port>``
sends ``GET http://api/users HTTP/1.1`` (absolute form); one that calls the port
directly sends ``GET /users`` with ``Host: api``. Either way the host (without its
port, any case) names one of the source service's upstreams
(``proxy.snapshot.ForwardProxy.hosts``: ``api``, ``api.service.consul``,
``api.service.<dc>.consul``), and the request goes through that upstream's route chain
exactly as on the upstream's own listener: the same runtime (breakers, retry budget,
outlier state), the same pooled mTLS connections (one source certificate). An
absolute-form target is sent on in origin form (``/users``). A host that is no
upstream of the service gets 404 ``x-meshnode-error: no-upstream: ...``.

This is :class:`proxy.l7.transport.HttpOutboundListener` with the runtime chosen per
request instead of per listener; it lives apart so the outbound listener's hot path
carries nothing for it. It touches the outbound listener's internals on purpose (the
same package).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from proxy.l7.transport import HttpOutboundListener, _OutboundExchange

if TYPE_CHECKING:
    from random import Random

    from proxy import tls
    from proxy.l7.http import RequestHead
    from proxy.runtime import ForwardRuntime, UpstreamRuntime
    from proxy.telemetry import AccessLogger, Telemetry

#: The destination label of a forward proxy's downstream connections (they may carry
#: requests to several upstreams).
ANY_DESTINATION = "*"


def forward_target(head: RequestHead) -> tuple[str, bytes]:
    """(host, origin-form target) of a request to a forward proxy: the authority of an
    absolute-form target, else the ``Host`` header."""
    target = head.target
    if target[:7].lower() == b"http://":
        rest = target[7:]
        end = len(rest)
        for delimiter in (b"/", b"?"):
            found = rest.find(delimiter)
            if 0 <= found < end:
                end = found
        authority, path = rest[:end], rest[end:]
        if not path.startswith(b"/"):
            path = b"/" + path
        return authority.decode("latin-1"), path
    return head.request().headers.get("host", ""), target


@dataclass(frozen=True, slots=True)
class _Listening:
    """What the outbound listener's own methods read of ``_runtime.upstream`` (where
    to bind, telemetry labels of downstream connections, idle timeout), for a forward
    proxy: its address, its source, any destination."""

    host: str
    port: int
    source: str
    idle_timeout: float
    destination: str = ANY_DESTINATION
    routes: tuple[object, ...] = ()
    """None of its own: every request builds its ``HttpRequest`` (the outbound
    listener's per-upstream shortcuts stay off)."""


@dataclass(frozen=True, slots=True)
class _Home:
    upstream: _Listening
    clusters: Mapping[str, object] = field(default_factory=dict)


def _home(runtime: ForwardRuntime) -> UpstreamRuntime:
    forward = runtime.forward
    listening = _Listening(forward.host, forward.port, forward.source, forward.idle_timeout)
    return cast("UpstreamRuntime", _Home(listening))


class _ForwardExchange(_OutboundExchange):
    __slots__ = ()

    def start(self) -> None:
        listener = cast("HttpForwardListener", self._listener)
        host, target = forward_target(self.head)
        runtime = listener.forward.runtime_for(host) if host else None
        if runtime is None:
            source = listener.forward.forward.source
            self.respond_error(404, f"no-upstream: {host!r} is not an upstream of {source}")
            return
        if target is not self.head.target:
            self.head.target = target
        # The outbound exchange takes the listener's runtime at its start (and keeps
        # it); the listener's own stays the forward proxy's.
        home = listener._runtime
        listener._runtime = runtime
        try:
            super().start()
        finally:
            listener._runtime = home


class HttpForwardListener(HttpOutboundListener):
    """A loopback HTTP forward proxy for one source service (see the module doc)."""

    exchange_class = _ForwardExchange

    def __init__(
        self,
        runtime: ForwardRuntime,
        contexts: tls.ClientContexts | None,
        telemetry: Telemetry,
        access_log: AccessLogger,
        *,
        rng: Random | None = None,
    ) -> None:
        self.forward = runtime
        super().__init__(
            _home(runtime), cast("tls.ClientContexts", contexts), telemetry, access_log, rng=rng
        )

    def update(  # type: ignore[override]
        self, runtime: ForwardRuntime, contexts: tls.ClientContexts | None
    ) -> None:
        """New upstreams or certificates, for new requests; pooled connections to
        endpoints no upstream has any more are closed."""
        previous = self.forward
        self.forward = runtime
        self._runtime = _home(runtime)
        if contexts is not None and contexts is not self._contexts:
            self._contexts = contexts
            self._pool.generation += 1
        wanted: set[object] = {
            (e.host, e.port, e.sni)
            for upstream in runtime.upstreams.values()
            for cluster in upstream.clusters.values()
            for e in cluster.cluster.endpoints
        }
        self._pool.retire(wanted)
        if previous.forward.idle_timeout != runtime.forward.idle_timeout:
            self._idle.reschedule()
