"""proxy.tls: contexts from PEM strings, SPIFFE IDs of peers, resumption, failure reasons.

Real certificates from ``ca.issuer`` and real handshakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.issuer import CertificateAuthority, generate_key, make_csr, private_key_pem
from ca.spiffe import SpiffeId
from proxy import tls

DATACENTER = "dc1"


@dataclass(frozen=True)
class Leaf:
    spiffe_id: str
    chain_pem: str
    key_pem: str


@dataclass(frozen=True)
class Pki:
    trust_domain: str
    root_pem: str
    authority: CertificateAuthority

    def leaf(self, service: str) -> Leaf:
        now = datetime.now(UTC)
        spiffe_id = SpiffeId.service(self.trust_domain, DATACENTER, service)
        key = generate_key()
        signed = self.authority.sign_csr(
            make_csr(key, spiffe_id), expected=spiffe_id, registered=True, now=now
        )
        return Leaf(spiffe_id.uri, signed.chain_pem, private_key_pem(key))


def make_pki(trust_domain: str) -> Pki:
    authority = CertificateAuthority.create_root(trust_domain, datetime.now(UTC))
    return Pki(trust_domain, authority.active_root.cert_pem, authority)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki("test.meshnode")


def test_contexts_are_tls13_mutual_without_hostname_check(pki: Pki) -> None:
    leaf = pki.leaf("api")
    server = tls.server_context([pki.root_pem], leaf.chain_pem, leaf.key_pem)
    client = tls.client_context([pki.root_pem], leaf.chain_pem, leaf.key_pem)
    for context in (server, client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname is False
        assert context.sslobject_class is tls.ObservedSSLObject


def test_a_key_that_does_not_match_the_chain_is_refused(pki: Pki) -> None:
    leaf, other = pki.leaf("api"), pki.leaf("web")
    with pytest.raises(ssl.SSLError):
        tls.server_context([pki.root_pem], leaf.chain_pem, other.key_pem)


def test_an_empty_bundle_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="empty"):
        tls.server_context([])


def _der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def test_spiffe_id_of_certificate_reads_the_uri_san(pki: Pki) -> None:
    leaf = pki.leaf("api")
    assert tls.spiffe_id_of_certificate(_der(leaf.chain_pem)) == leaf.spiffe_id


class _FakePeer:
    """What ``peer_spiffe_id`` reads of an ``SSLObject``, counting decodes."""

    def __init__(self, der: bytes, names: tuple[tuple[str, str], ...]) -> None:
        self.der = der
        self.names = names
        self.decoded = 0

    def getpeercert(self, binary_form: bool = False) -> Any:
        if binary_form:
            return self.der
        self.decoded += 1
        return {"subjectAltName": self.names}


def test_peer_spiffe_id_decodes_a_leaf_once() -> None:
    tls.forget_peer_ids()
    peer = _FakePeer(b"leaf-1", (("DNS", "x"), ("URI", "spiffe://td/ns/default/dc/dc1/svc/api")))
    for _ in range(3):
        assert tls.peer_spiffe_id(peer) == "spiffe://td/ns/default/dc/dc1/svc/api"
    assert peer.decoded == 1
    two = _FakePeer(b"leaf-2", (("URI", "spiffe://td/a"), ("URI", "spiffe://td/b")))
    assert tls.peer_spiffe_id(two) is None
    assert tls.peer_spiffe_id(_FakePeer(b"leaf-3", ())) is None
    assert tls.peer_spiffe_id(_FakePeer(b"", ())) is None


def test_the_peer_id_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    tls.forget_peer_ids()
    monkeypatch.setattr(tls, "PEER_ID_CACHE_SIZE", 2)
    peers = [_FakePeer(bytes([i]), (("URI", f"spiffe://td/{i}"),)) for i in range(3)]
    for peer in peers:
        tls.peer_spiffe_id(peer)
    tls.peer_spiffe_id(peers[0])
    assert peers[0].decoded == 2  # evicted by the third
    tls.forget_peer_ids()


def _self_signed(uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now.replace(year=now.year + 1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "uris", [[], ["https://example.com"], ["spiffe://a/x", "spiffe://a/y"]], ids=str
)
def test_no_single_spiffe_uri_means_no_identity(uris: list[str]) -> None:
    assert tls.spiffe_id_of_certificate(_self_signed(uris)) is None


def test_garbage_is_no_identity() -> None:
    assert tls.spiffe_id_of_certificate(b"\x30\x03garbage") is None
    assert tls.peer_spiffe_id(None) is None


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (ssl.SSLEOFError(), "eof"),
        (ConnectionResetError(), "eof"),
        (ValueError(), "other"),
    ],
)
def test_failure_reason(error: BaseException, label: str) -> None:
    assert tls.failure_reason(error) == label
    assert label in tls.FAILURE_LABELS


def test_client_contexts_one_per_address_bounded(pki: Pki) -> None:
    leaf = pki.leaf("web")
    contexts = tls.ClientContexts([pki.root_pem], leaf.chain_pem, leaf.key_pem, capacity=2)
    first = contexts.context_for(("127.0.0.1", 1), "api")
    assert contexts.context_for(("127.0.0.1", 1), "api") is first
    assert contexts.context_for(("127.0.0.1", 1), "db") is not first
    contexts.context_for(("127.0.0.1", 2), "api")
    assert len(contexts) == 2
    assert contexts.context_for(("127.0.0.1", 1), "api") is not first  # evicted, rebuilt


class _Hello(asyncio.Protocol):
    """Answers b"hi" once the handshake is done and records what it saw."""

    seen: ClassVar[list[tuple[str | None, bool]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        ssl_object = transport.get_extra_info("ssl_object")
        self.seen.append((tls.peer_spiffe_id(ssl_object), ssl_object.session_reused))
        transport.write(b"hi")


async def _hello_server(
    pki: Pki, failures: list[str], services: dict[str, ssl.SSLContext]
) -> tuple[asyncio.Server, int]:
    selector = tls.ServiceSelector(services)
    context = tls.listener_context([pki.root_pem], selector, failures.append)
    server = await asyncio.get_running_loop().create_server(_Hello, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def test_sni_selects_the_leaf_and_sessions_resume(pki: Pki) -> None:
    api, db, web = pki.leaf("api"), pki.leaf("db"), pki.leaf("web")
    failures: list[str] = []
    services = {
        name: tls.server_context([pki.root_pem], leaf.chain_pem, leaf.key_pem)
        for name, leaf in (("api", api), ("db", db))
    }
    _Hello.seen = []
    server, port = await _hello_server(pki, failures, services)
    contexts = tls.ClientContexts([pki.root_pem], web.chain_pem, web.key_pem)
    try:
        for sni, expected in (("api", api), ("db", db), ("api", api)):
            context = contexts.context_for(("127.0.0.1", port), sni)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=sni
            )
            assert await reader.read(2) == b"hi"
            ssl_object = writer.get_extra_info("ssl_object")
            assert tls.peer_spiffe_id(ssl_object) == expected.spiffe_id
            context.remember_session(ssl_object)
            writer.close()
    finally:
        server.close()
    assert [peer for peer, _ in _Hello.seen] == [web.spiffe_id] * 3
    # One session per (address, SNI): db's first connection is a full handshake.
    assert [reused for _, reused in _Hello.seen] == [False, False, True]
    assert failures == []


async def test_handshake_failures_are_counted_by_reason(pki: Pki) -> None:
    api, web = pki.leaf("api"), pki.leaf("web")
    failures: list[str] = []
    services = {"api": tls.server_context([pki.root_pem], api.chain_pem, api.key_pem)}
    server, port = await _hello_server(pki, failures, services)
    try:
        # plaintext
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
        # unknown SNI
        contexts = tls.ClientContexts([pki.root_pem], web.chain_pem, web.key_pem)
        context = contexts.context_for(("x", 1), "nope")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="nope")
        # a client certificate from another CA
        foreign = make_pki("other.meshnode").leaf("web")
        context = tls.client_context([pki.root_pem], foreign.chain_pem, foreign.key_pem)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="api"
        )
        with pytest.raises((ssl.SSLError, ConnectionError)):
            data = await reader.read(2)
            assert data == b""
            raise ConnectionResetError
        writer.close()
        await asyncio.sleep(0.05)
    finally:
        server.close()
    assert failures == ["plaintext", "unknown_sni", "untrusted_certificate"]
