"""What the data plane decides when a snapshot arrives, without doing any I/O: which
listeners to create, update, replace or close, and which TLS contexts to build or
keep. The asyncio side that carries it out is ``proxy/plane/transport.py``.

Theory of operation
-------------------
A snapshot arrives for every catalog or policy change, most of which change an
endpoint list and nothing else, so applying one must be cheap and must not disturb
what did not change:

* **Listeners** are keyed by address: the inbound port by its (host, port), outbound
  listeners by their upstream's (host, port). :func:`plan_listeners` compares the
  running set with the snapshot: new addresses are *created* (bound before anything
  else changes, so a port that cannot be bound rejects the whole snapshot with the
  old one intact); kept addresses are *updated* in place (new connections use the
  new runtime, open ones finish under theirs); an address whose protocol changed
  (tcp ↔ http) is *replaced* (the old listener closed, then a new one bound on the
  same port); addresses that left are *closed* with their connections (they are no
  longer allowed).
* **TLS contexts** are expensive (a key load is about a millisecond) and carry
  state worth keeping: a client context remembers the TLS session of its peer for
  resumption, and the inbound port's session tickets are only useful while the
  server contexts stay. :class:`TlsMaterial` keys every context by exactly what it is
  made of (trust bundle, chain, key), reuses the previous snapshot's contexts for
  unchanged keys and builds the rest, so a certificate rotation makes new contexts
  for new connections while open connections keep the ones they use.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from proxy import tls
from proxy.snapshot import Certificate, Snapshot

Address = tuple[str, int]
ProtocolName = Literal["tcp", "http", "forward"]
"""An outbound listener's kind: an upstream's protocol, or an HTTP forward proxy."""
InboundAction = Literal["none", "create", "update", "rebind", "close"]

_MaterialKey = tuple[tuple[str, ...], str, str]


class SnapshotRejected(ValueError):
    """A snapshot that could not be applied; the previous one still serves."""


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    inbound: InboundAction
    create: tuple[Address, ...]
    """Outbound addresses to bind (before anything else changes)."""
    replace: tuple[Address, ...]
    """Outbound addresses whose protocol changed: close the old, bind the new."""
    update: tuple[Address, ...]
    close: tuple[Address, ...]
    wanted: Mapping[Address, ProtocolName]
    """Every outbound listener of the snapshot, with its kind."""


def plan_listeners(
    inbound: Address | None, outbound: Mapping[Address, ProtocolName], snapshot: Snapshot
) -> ListenerPlan:
    """What to do to go from the running listeners (``inbound``'s address, the
    outbound ones with their protocol) to ``snapshot``'s."""
    wanted = snapshot.inbound
    action: InboundAction
    if wanted is None:
        action = "none" if inbound is None else "close"
    elif inbound is None:
        action = "create"
    else:
        action = "update" if inbound == (wanted.host, wanted.port) else "rebind"
    upstreams: dict[Address, ProtocolName] = {
        (u.host, u.port): u.protocol for u in snapshot.upstreams
    }
    for forward in snapshot.forward_proxies:
        upstreams[(forward.host, forward.port)] = "forward"
    create = tuple(a for a in upstreams if a not in outbound)
    replace = tuple(a for a, p in upstreams.items() if a in outbound and outbound[a] != p)
    update = tuple(a for a, p in upstreams.items() if outbound.get(a) == p)
    close = tuple(a for a in outbound if a not in upstreams)
    return ListenerPlan(action, create, replace, update, close, upstreams)


def _key(bundle: tuple[str, ...], certificate: Certificate) -> _MaterialKey:
    return bundle, certificate.chain_pem, certificate.key_pem


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The TLS contexts one snapshot needs, by what they are made of."""

    servers: Mapping[_MaterialKey, tls.MeshContext]
    clients: Mapping[_MaterialKey, tls.ClientContexts]
    sni: Mapping[str, ssl.SSLContext]
    """Every SNI name of the inbound targets → its service's server context."""
    upstreams: Mapping[Address, tls.ClientContexts]
    """Each upstream's (and forward proxy's) source-service client contexts, by
    listener address. A forward proxy with no upstream has none."""

    @staticmethod
    def build(
        snapshot: Snapshot,
        previous: TlsMaterial | None,
        observer: tls.HandshakeObserver | None = None,
    ) -> TlsMaterial:
        """The contexts of ``snapshot``, reusing ``previous``'s where the bundle and
        certificate are the same. Raises ``ssl.SSLError``/``ValueError`` for bad
        PEMs (nothing is changed then: the result is a new object)."""
        bundle = tuple(snapshot.trust_bundle)
        old_servers = previous.servers if previous is not None else {}
        old_clients = previous.clients if previous is not None else {}
        servers: dict[_MaterialKey, tls.MeshContext] = {}
        clients: dict[_MaterialKey, tls.ClientContexts] = {}
        sni: dict[str, ssl.SSLContext] = {}
        inbound = snapshot.inbound
        if inbound is not None:
            by_service: dict[str, ssl.SSLContext] = {}
            for name, service in inbound.services.items():
                key = _key(bundle, service.certificate)
                context = servers.get(key)
                if context is None:
                    context = old_servers.get(key)
                if context is None:
                    context = tls.server_context(bundle, *key[1:])
                servers[key] = context
                by_service[name] = context
            sni = {name: by_service[target.service] for name, target in inbound.targets.items()}
        upstreams: dict[Address, tls.ClientContexts] = {}
        for upstream in snapshot.upstreams:
            key = _key(bundle, upstream.certificate)
            # Not ``or``: a ClientContexts with no peer yet has a length of 0.
            contexts = clients.get(key)
            if contexts is None:
                contexts = old_clients.get(key)
            if contexts is None:
                contexts = tls.ClientContexts(bundle, *key[1:], observer=observer)
            clients[key] = contexts
            upstreams[(upstream.host, upstream.port)] = contexts
        by_source = {u.source: upstreams[(u.host, u.port)] for u in reversed(snapshot.upstreams)}
        for forward in snapshot.forward_proxies:
            if forward.source in by_source:
                upstreams[(forward.host, forward.port)] = by_source[forward.source]
        return TlsMaterial(servers, clients, sni, upstreams)
