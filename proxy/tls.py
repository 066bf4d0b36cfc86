"""Mutual TLS for the data plane: contexts built from PEM strings, SPIFFE identities of
peers, client-side session resumption, handshake failures counted by reason.

Theory of operation
-------------------
Every proxy-to-proxy connection is TLS 1.3 with a certificate on both ends, verified
against the trust bundle (the CA roots, SPIFFE "X509-SVID" §4). Identities are SPIFFE
IDs in the certificate's single URI SAN (X509-SVID §2), not DNS names, so hostname
checking is off and the proxy compares the peer's URI SAN itself:

* the **inbound** side (server) requires a client certificate chaining to the bundle,
  picks the local service from the client's SNI (:class:`ServiceSelector`, an
  ``sni_callback`` switching to that service's context, hence its leaf), then hands
  the peer's SPIFFE ID (:func:`peer_spiffe_id`) to the intention check;
* the **outbound** side (client) presents the source service's leaf, verifies the
  chain, then checks that the server's SPIFFE ID is the upstream it meant to reach.

PEMs arrive as strings (from the agent's snapshot). ``SSLContext.load_cert_chain``
only reads paths, so the chain and key are written to an anonymous in-memory file
(``memfd_create``, read back through ``/proc/self/fd``) and never touch a disk; where
that does not exist, to a private 0700 temporary directory removed at once. Roots go
through ``load_verify_locations(cadata=...)``, no file at all.

Resumption: a full ECDSA mTLS handshake costs ~1.5 ms of CPU here, a resumed one
~0.6 ms (reference/proxy-speed.md). asyncio's ``create_connection`` has no ``session``
argument, so :class:`ClientContexts` keeps one client context per peer address and SNI, each
remembering the last session it got there (:meth:`MeshContext.remember_session`) and
offering it in the next handshake (its ``wrap_bio`` passes ``session=``). A TLS 1.3
session ticket arrives after the handshake, so the session is taken after the first
read. OpenSSL only accepts a session on the context that made it, which is the other
reason for a context per address.

Handshake failures are reported by reason through :class:`ObservedSSLObject`: the
event loop calls its ``do_handshake``, which tells the context's
``handshake_observer`` why a handshake failed (the loops log such errors at debug
level only, so the listener would otherwise never know).

This module does no I/O of its own and is safe to use from any event loop.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Final

#: Parsed peer certificates kept (DER → SPIFFE ID). Parsing one costs tens of µs;
#: a mesh has few distinct leaves alive at once (one per service instance and
#: rotation), so a thousand covers any host with room to spare.
PEER_ID_CACHE_SIZE: Final = 1024
#: Peer addresses whose client context (and so last session) is kept.
CLIENT_CONTEXTS_PER_SOURCE: Final = 256
SPIFFE_SCHEME: Final = "spiffe://"

#: OpenSSL reasons (``SSLError.reason``) → the bounded labels counted in metrics.
_FAILURE_REASONS: Final = {
    "WRONG_VERSION_NUMBER": "plaintext",
    "HTTP_REQUEST": "plaintext",
    "HTTPS_PROXY_REQUEST": "plaintext",
    "UNKNOWN_PROTOCOL": "plaintext",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_certificate",
    "CERTIFICATE_VERIFY_FAILED": "untrusted_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "peer_rejected_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer_rejected_certificate",
    "TLSV1_ALERT_CERTIFICATE_REQUIRED": "peer_rejected_certificate",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "CALLBACK_FAILED": "unknown_sni",
    "TLSV1_UNRECOGNIZED_NAME": "unknown_sni",
    "TLSV1_ALERT_UNRECOGNIZED_NAME": "unknown_sni",
    "CLIENTHELLO_TLSEXT": "unknown_sni",
}
#: Labels of failures found by the proxy itself after a handshake.
WRONG_IDENTITY: Final = "wrong_identity"
"""The server's SPIFFE ID is not the upstream the outbound side meant to reach."""
FAILURE_LABELS: Final = (
    *sorted(set(_FAILURE_REASONS.values())),
    "eof",
    "other",
    WRONG_IDENTITY,
)

HandshakeObserver = Callable[[str], None]


def failure_reason(exc: BaseException) -> str:
    """The bounded label (one of :data:`FAILURE_LABELS`) of a failed handshake."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
        return "eof"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return _FAILURE_REASONS.get(reason, "other")
    return "other"


class ObservedSSLObject(ssl.SSLObject):
    """An ``SSLObject`` that tells its context's observer why a handshake failed."""

    _mesh_observer: HandshakeObserver | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not a failure: the handshake needs more bytes
        except (ssl.SSLError, OSError) as exc:
            observer = self._mesh_observer
            if observer is not None:
                observer(failure_reason(exc))
            raise


class MeshContext(ssl.SSLContext):
    """An ``SSLContext`` with the two hooks the proxy needs: a handshake observer,
    and (clients) the session to offer in the next handshake."""

    handshake_observer: HandshakeObserver | None = None
    resume_session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.resume_session
        wrapped = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        # The event loop calls read/write/pending once per record or more: bind the C
        # methods on the instance, skipping ssl.SSLObject's one-line Python wrappers
        # (-5 % of a proxy's user-space instructions per request, measured with
        # callgrind on the L4 pair). Same signatures: read(len, buffer=None), write(data).
        native = wrapped._sslobj  # type: ignore[attr-defined]
        wrapped.read = native.read  # type: ignore[method-assign]
        wrapped.write = native.write  # type: ignore[method-assign]
        wrapped.pending = native.pending  # type: ignore[method-assign]
        if self.handshake_observer is not None:
            wrapped._mesh_observer = self.handshake_observer  # type: ignore[attr-defined]
        return wrapped

    def remember_session(self, ssl_object: ssl.SSLObject) -> None:
        """Keep ``ssl_object``'s session for the next connections (once it has a
        ticket: TLS 1.3 sends tickets after the handshake).

        Only after a full handshake: a resumed connection means the kept session
        still works (OpenSSL's stateless tickets can be reused until they expire),
        and reading ``SSLObject.session`` leaks a copy of the session (~6 KB) on
        CPython ≤ 3.12.5 (python/cpython gh-116810), so it is read once per full
        handshake, not once per connection."""
        if ssl_object.session_reused and self.resume_session is not None:
            return
        session = ssl_object.session
        if session is not None and session.has_ticket:
            self.resume_session = session


def _joined(pems: Iterable[str]) -> str:
    text = "".join(pem if pem.endswith("\n") else pem + "\n" for pem in pems)
    if not text.strip():
        raise ValueError("the trust bundle is empty")
    return text


def _load_chain(context: ssl.SSLContext, chain_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` from strings, through an anonymous memory file or, without
    ``memfd_create``, a private temporary directory; nothing is left behind."""
    material = (chain_pem.rstrip("\n") + "\n" + key_pem).encode("ascii")
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        descriptor = memfd_create("meshnode-leaf", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(descriptor, material)
            context.load_cert_chain(f"/proc/self/fd/{descriptor}")
            return
        except FileNotFoundError:
            pass  # no /proc: fall back to a file
        finally:
            os.close(descriptor)
    with tempfile.TemporaryDirectory(prefix="meshnode-tls-") as directory:  # mode 0700
        path = os.path.join(directory, "leaf.pem")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(material)
        context.load_cert_chain(path)


def _mesh_context(
    protocol: ssl._SSLMethod,
    trust_bundle: Iterable[str],
    chain_pem: str | None,
    key_pem: str | None,
) -> MeshContext:
    context = MeshContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # identities are SPIFFE URIs, checked by the proxy
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=_joined(trust_bundle))
    context.sslobject_class = ObservedSSLObject
    if chain_pem is not None:
        if key_pem is None:
            raise ValueError("a certificate chain needs its private key")
        _load_chain(context, chain_pem, key_pem)
    return context


def server_context(
    trust_bundle: Iterable[str], chain_pem: str | None = None, key_pem: str | None = None
) -> MeshContext:
    """TLS 1.3 only, client certificate required and verified against
    ``trust_bundle`` (root PEMs), presenting ``chain_pem`` (leaf first) with
    ``key_pem``. Without a chain it can only be a listener's base context whose
    ``sni_callback`` switches to a service's context (:class:`ServiceSelector`)."""
    return _mesh_context(ssl.PROTOCOL_TLS_SERVER, trust_bundle, chain_pem, key_pem)


def client_context(trust_bundle: Iterable[str], chain_pem: str, key_pem: str) -> MeshContext:
    """TLS 1.3 only, the server's chain verified against ``trust_bundle``, no
    hostname check (compare :func:`peer_spiffe_id` with the expected ID instead),
    presenting the source service's leaf ``chain_pem`` with ``key_pem``."""
    return _mesh_context(ssl.PROTOCOL_TLS_CLIENT, trust_bundle, chain_pem, key_pem)


# ---------------------------------------------------------------------------- identities


def _single_spiffe_uri(uris: list[str]) -> str | None:
    # X509-SVID §2: exactly one URI SAN, and it is the SPIFFE ID.
    if len(uris) != 1 or not uris[0].startswith(SPIFFE_SCHEME):
        return None
    return uris[0]


def spiffe_id_of_certificate(der: bytes) -> str | None:
    """The single ``spiffe://`` URI SAN of a DER certificate, or ``None`` when it has
    none, several URI SANs (X509-SVID §2 forbids it) or does not parse. Parsed with
    ``cryptography``, imported on first use (tools and tests; a proxy reads its
    peers' IDs with :func:`peer_spiffe_id`, which needs no second parser)."""
    from cryptography import x509  # ~10 MB of resident memory a worker does without

    try:
        certificate = x509.load_der_x509_certificate(der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return None
    return _single_spiffe_uri(names.value.get_values_for_type(x509.UniformResourceIdentifier))


#: Peer leaf DER → its SPIFFE ID, least recently used dropped beyond
#: :data:`PEER_ID_CACHE_SIZE`. Keyed by the bytes (their hash, then equality).
_peer_ids: OrderedDict[bytes, str | None] = OrderedDict()


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The SPIFFE ID of the verified peer of a completed handshake, or ``None``.

    OpenSSL already parsed the certificate to verify it: its decoded form
    (``getpeercert()``, available because verification is required) gives the URI
    SANs, so the proxy loads no second X.509 parser (``cryptography`` costs a worker
    ~10 MB of its 60 MB budget). Decoding costs tens of µs, so the answer is cached
    by the DER bytes: ~1 µs for a peer seen before."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        spiffe_id = _peer_ids[der]
    except KeyError:
        pass
    else:
        _peer_ids.move_to_end(der)
        return spiffe_id
    decoded = ssl_object.getpeercert()
    names = decoded.get("subjectAltName", ()) if decoded else ()
    uris = [
        name[1]
        for name in names
        if isinstance(name, tuple) and name[0] == "URI" and isinstance(name[1], str)
    ]
    spiffe_id = _single_spiffe_uri(uris)
    _peer_ids[der] = spiffe_id
    if len(_peer_ids) > PEER_ID_CACHE_SIZE:
        _peer_ids.popitem(last=False)
    return spiffe_id


def forget_peer_ids() -> None:
    """Empty the peer-ID cache (tests, or after a trust bundle change)."""
    _peer_ids.clear()


# ---------------------------------------------------------------------------- servers


class ServiceSelector:
    """The ``sni_callback`` of an inbound listener's base context: switches the
    connection to the context of the service its SNI names (so that service's leaf
    is presented), and aborts the handshake for a missing or unknown name.

    ``contexts`` is replaced as a whole by :meth:`update` (one reference swap), so a
    new configuration applies to the next handshake."""

    def __init__(self, contexts: Mapping[str, ssl.SSLContext]) -> None:
        self._contexts: Mapping[str, ssl.SSLContext] = dict(contexts)

    def update(self, contexts: Mapping[str, ssl.SSLContext]) -> None:
        self._contexts = dict(contexts)

    def __call__(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        context = self._contexts.get(server_name) if server_name is not None else None
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = context
        return None


def listener_context(
    trust_bundle: Iterable[str], selector: ServiceSelector, observer: HandshakeObserver | None
) -> MeshContext:
    """The base context of an inbound listener: no leaf of its own, every handshake
    is switched by ``selector`` to a service's context (which then also provides
    the roots the client certificate is verified against)."""
    context = server_context(trust_bundle)
    context.sni_callback = selector
    context.handshake_observer = observer
    return context


# ---------------------------------------------------------------------------- clients


class ClientContexts:
    """Client contexts of one source service, one per (peer address, SNI) (bounded,
    least recently used dropped), each remembering its last TLS session for resumption.

    The key is loaded once per address (≈ a millisecond); after that a connection
    costs only its (resumed) handshake."""

    def __init__(
        self,
        trust_bundle: Iterable[str],
        chain_pem: str,
        key_pem: str,
        *,
        observer: HandshakeObserver | None = None,
        capacity: int = CLIENT_CONTEXTS_PER_SOURCE,
    ) -> None:
        self._trust_bundle = tuple(trust_bundle)
        self._chain_pem = chain_pem
        self._key_pem = key_pem
        self._observer = observer
        self._capacity = capacity
        self._contexts: OrderedDict[tuple[str, int, str], MeshContext] = OrderedDict()
        # Build one now: bad PEMs fail here, at configuration time, not per connection.
        self._template: MeshContext | None = self._new()

    def _new(self) -> MeshContext:
        context = client_context(self._trust_bundle, self._chain_pem, self._key_pem)
        context.handshake_observer = self._observer
        return context

    def context_for(self, address: tuple[str, int], server_name: str) -> MeshContext:
        """The context for connections to ``address`` with SNI ``server_name``. Keyed
        by both: one inbound port serves many services, and a session made for one
        of them must not be offered to another (a resumed TLS 1.3 session carries
        the first server's certificate, so the client would see the wrong peer)."""
        key = (*address, server_name)
        context = self._contexts.get(key)
        if context is not None:
            self._contexts.move_to_end(key)
            return context
        if self._template is not None:
            context, self._template = self._template, None
        else:
            context = self._new()
        self._contexts[key] = context
        if len(self._contexts) > self._capacity:
            self._contexts.popitem(last=False)
        return context

    def __len__(self) -> int:
        return len(self._contexts)
