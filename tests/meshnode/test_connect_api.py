"""``meshnode.connect_api``: the Connect routes over a real, in-process Connect side.

``InProcessConnect`` is a complete ``ConnectHandle`` in one process: this agent is its
own CA leader. It holds a real ``PolicyStore`` whose entries it signs with a real
ECDSA P-256 key (and verifies, as an agent verifies against the trust bundle), and a
real ``CertificateAuthority`` that signs real CSRs for the leaves. Switches simulate
what a cluster does to an agent: losing the leader, a leader that refuses the token,
a bundle that has not arrived yet. Requests go through aiohttp's real server stack.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from ca.bundle import TrustBundle, rfc3339, verify_leaf
from ca.issuer import CertificateAuthority, generate_key, make_csr, private_key_pem
from ca.spiffe import SpiffeId
from meshnode.api import build_app, serve
from meshnode.catalog import Catalog
from meshnode.config import AclConfig
from meshnode.connect import (
    ConnectHandle,
    LocalLeaf,
    NoLeaderError,
    PermissionDeniedError,
    RequestRefusedError,
)
from meshnode.model import NodeInfo
from meshnode.policy import (
    KIND_INTENTION,
    PolicyEntry,
    PolicyStore,
    PolicyValue,
    intention_id,
    sign_entry,
    validate_against,
)
from tests.meshnode.test_api import FakeAgent

TOKEN = "0123456789abcdef-secret"
TRUST_DOMAIN = "7b0a2c1e-4d5f-4a6b-8c9d-0e1f2a3b4c5d.meshnode"
OTHER_DOMAIN = "00000000-0000-4000-8000-000000000000.meshnode"
KEY_ID = "test-leader"


def now() -> datetime:
    return datetime.now(UTC)


def service_uri(service: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return SpiffeId.service(trust_domain, "dc1", service).uri


# --------------------------------------------------------------------------- the Connect side


class InProcessConnect:
    """A real ``ConnectHandle`` whose agent is also the CA leader (no network)."""

    def __init__(self, services: tuple[str, ...] = ("web", "api", "db")) -> None:
        self._signing_key = ec.generate_private_key(ec.SECP256R1())
        self._policy = PolicyStore(self._verify)
        self.ca = CertificateAuthority.create_root(TRUST_DOMAIN, now())
        self.services = set(services)
        self.default_policy = "deny"
        self.has_leader = True
        self.bundle_arrived = True
        self.operator_ca = False
        self.leader_token: str | None = None
        """With a value, the leader refuses writes presenting another token."""
        self.tokens_seen: list[str | None] = []
        self._index = 1
        self._leaves: dict[str, LocalLeaf] = {}
        self.listeners: list[Callable[[int], None]] = []

    # ------------------------------------------------------------------ signing

    def _sign(self, payload: bytes) -> tuple[bytes, str]:
        return self._signing_key.sign(payload, ec.ECDSA(hashes.SHA256())), KEY_ID

    def _verify(self, payload: bytes, signature: bytes, key_id: str) -> bool:
        if key_id != KEY_ID:
            return False
        try:
            self._signing_key.public_key().verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    # ------------------------------------------------------------------ ConnectHandle

    @property
    def policy(self) -> PolicyStore:
        return self._policy

    @property
    def default_intention_policy(self) -> str:
        return self.default_policy

    def trust_bundle(self) -> TrustBundle | None:
        return self.ca.bundle() if self.bundle_arrived else None

    def connect_index(self) -> int:
        return self._index

    def on_connect_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        self.listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self.listeners:
                self.listeners.remove(callback)

        return unsubscribe

    async def leaf_certificate(self, service: str) -> LocalLeaf:
        if service not in self.services:
            raise LookupError(service)
        leaf = self._leaves.get(service)
        if leaf is not None and leaf.root_id == self.ca.bundle().active_root_id:
            return leaf
        if not self.has_leader:
            if leaf is not None:
                return leaf  # still valid under the old root until someone re-issues
            raise NoLeaderError("No cluster leader")
        return self.renew(service)

    async def write_policy(self, value: PolicyValue, token: str | None) -> PolicyEntry:
        self._leader_accepts(token)
        validate_against(value, self._policy.values())
        entry = self._policy.prepare_write(value, 1, int(time.time() * 1000))
        assert self._policy.apply(sign_entry(entry, self._sign), time.monotonic())
        applied = self._policy.entry(value.kind, value.name)
        assert applied is not None
        return applied

    async def delete_policy(self, kind: str, name: str, token: str | None) -> bool:
        self._leader_accepts(token)
        if self._policy.get(kind, name) is None:
            return False
        entry = self._policy.prepare_delete(kind, name, 1, int(time.time() * 1000))
        return self._policy.apply(sign_entry(entry, self._sign), time.monotonic())

    async def rotate_ca(self, token: str | None) -> str:
        self._leader_accepts(token)
        if self.operator_ca:
            raise RequestRefusedError(
                "operator_ca", "an operator CA is rotated by configuring new files"
            )
        new_id = self.ca.rotate_root(now())
        self._bump()  # the bundle changed; leaves re-issue when next asked for
        return new_id

    def ca_status(self) -> dict[str, object]:
        expiry = min((leaf.not_after for leaf in self._leaves.values()), default=None)
        return {
            "Agents": [
                {
                    "Node": "node1",
                    "BundleFingerprint": self.ca.bundle().fingerprint(),
                    "SoonestLeafExpiry": None if expiry is None else rfc3339(expiry),
                    "Lagging": False,
                    "ExpiringSoon": False,
                }
            ]
        }

    # ------------------------------------------------------------------ simulation

    def renew(self, service: str) -> LocalLeaf:
        """Have the leader sign a fresh leaf for ``service`` (what renewal does)."""
        key = generate_key()
        identity = SpiffeId.service(TRUST_DOMAIN, "dc1", service)
        signed = self.ca.sign_csr(
            make_csr(key, identity), expected=identity, registered=True, now=now()
        )
        leaf = LocalLeaf(
            service=service,
            spiffe_id=identity.uri,
            cert_pem=signed.chain_pem,
            leaf_pem=signed.cert_pem,
            private_key_pem=private_key_pem(key),
            serial_number=signed.serial_number,
            not_before=signed.not_before,
            not_after=signed.not_after,
            root_id=signed.root_id,
            index=self._index + 1,
        )
        self._leaves[service] = leaf
        self._bump()
        return leaf

    def _bump(self) -> None:
        self._index += 1
        for listener in list(self.listeners):
            listener(self._index)

    def _leader_accepts(self, token: str | None) -> None:
        self.tokens_seen.append(token)
        if not self.has_leader:
            raise NoLeaderError("No cluster leader")
        if self.leader_token is not None and token != self.leader_token:
            raise PermissionDeniedError("token refused by the leader")


def _is_a_connect_handle(connect: InProcessConnect) -> ConnectHandle:
    return connect  # mypy checks that the double satisfies the protocol


# --------------------------------------------------------------------------- environment


@dataclass
class Env:
    client: TestClient[Any, Any]
    connect: InProcessConnect

    async def put(self, path: str, body: object = None, **kwargs: Any) -> aiohttp.ClientResponse:
        data = kwargs.pop("data", None)
        if data is None and body is not None:
            data = json.dumps(body)
        return await self.client.put(path, data=data, **kwargs)

    async def post(self, path: str, body: object, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.client.post(path, data=json.dumps(body), **kwargs)

    async def get_json(self, path: str, **kwargs: Any) -> Any:
        response = await self.client.get(path, **kwargs)
        assert response.status == 200, await response.text()
        return await response.json()

    async def ok(self, response: Awaitable[aiohttp.ClientResponse]) -> Any:
        answered = await response
        assert answered.status == 200, await answered.text()
        return await answered.json()

    async def refused(
        self, response: Awaitable[aiohttp.ClientResponse], status: int, *says: str
    ) -> str:
        answered = await response
        text = await answered.text()
        assert answered.status == status, text
        for part in says:
            assert part in text, text
        return text

    async def authorize(self, target: str, uri: str) -> dict[str, Any]:
        body = {"Target": target, "ClientCertURI": uri, "ClientCertSerial": "01:02"}
        result: dict[str, Any] = await self.ok(self.post("/v1/agent/connect/authorize", body))
        return result

    async def intention(self, source: str, destination: str, **body: Any) -> None:
        path = f"/v1/connect/intentions/exact?source={source}&destination={destination}"
        assert await self.ok(self.put(path, body or {"Action": "allow"})) is True

    async def config(self, body: dict[str, Any]) -> None:
        assert await self.ok(self.put("/v1/config", body)) is True


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env() -> AsyncIterator[EnvFactory]:
    clients: list[TestClient[Any, Any]] = []

    async def factory(acl: AclConfig | None = None) -> Env:
        catalog = Catalog(NodeInfo("node1", "id-node1", "10.0.0.1", "dc1"))
        connect = InProcessConnect()
        app = build_app(
            FakeAgent(catalog),
            catalog,
            acl=acl or AclConfig(),
            registry=CollectorRegistry(),
            datacenter="dc1",
            node_name="node1",
            rng=random.Random(7),
            connect=_is_a_connect_handle(connect),
        )
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return Env(client, connect)

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    return await make_env()


HTTP_WEB = {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}
RESOLVER_WEB = {
    "Kind": "service-resolver",
    "Name": "web",
    "DefaultSubset": "v1",
    "Subsets": {
        "v1": {"Filter": "Service.Meta.version == v1"},
        "v2": {"Filter": "Service.Meta.version == v2"},
    },
}
SPLITTER_WEB = {
    "Kind": "service-splitter",
    "Name": "web",
    "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}],
}


# --------------------------------------------------------------------------- CA roots


async def test_roots_have_consul_shape_on_both_paths(env: Env) -> None:
    bundle = env.connect.ca.bundle()
    for path in ("/v1/agent/connect/ca/roots", "/v1/connect/ca/roots"):
        response = await env.client.get(path)
        assert response.status == 200
        assert response.headers["X-Consul-Index"] == str(env.connect.connect_index())
        roots = await response.json()
        assert roots["ActiveRootID"] == bundle.active_root_id
        assert roots["TrustDomain"] == TRUST_DOMAIN
        [root] = roots["Roots"]
        assert set(root) == {
            "ID",
            "Name",
            "SerialNumber",
            "SigningKeyID",
            "NotBefore",
            "NotAfter",
            "RootCert",
            "IntermediateCerts",
            "Active",
        }
        assert root["ID"] == bundle.active_root_id and root["Active"] is True
        assert root["RootCert"] == bundle.roots[0].cert_pem
        assert isinstance(root["SerialNumber"], int) and root["IntermediateCerts"] == []


async def test_roots_before_the_bundle_arrives_are_503(env: Env) -> None:
    env.connect.bundle_arrived = False
    await env.refused(env.client.get("/v1/agent/connect/ca/roots"), 503, "CA not initialized")


async def test_rotation_wakes_a_blocked_roots_query(env: Env) -> None:
    index = env.connect.connect_index()
    old_root = env.connect.ca.bundle().active_root_id
    blocked = asyncio.create_task(
        env.client.get(f"/v1/agent/connect/ca/roots?index={index}&wait=10s")
    )
    await asyncio.sleep(0.1)
    assert not blocked.done()
    rotated = await env.ok(env.put("/v1/mesh/ca/rotate"))
    response = await asyncio.wait_for(blocked, 5)
    assert int(response.headers["X-Consul-Index"]) > index
    roots = await response.json()
    assert roots["ActiveRootID"] == rotated["ActiveRootID"] != old_root
    active = {root["ID"]: root["Active"] for root in roots["Roots"]}
    assert active == {old_root: False, rotated["ActiveRootID"]: True}
    # The new root comes with itself cross-signed by the old one (Consul's scheme).
    [new_root] = [r for r in roots["Roots"] if r["Active"]]
    assert len(new_root["IntermediateCerts"]) == 1


async def test_roots_query_times_out_with_the_same_index(env: Env) -> None:
    index = env.connect.connect_index()
    started = time.monotonic()
    response = await env.client.get(f"/v1/connect/ca/roots?index={index}&wait=100ms")
    assert time.monotonic() - started >= 0.1
    assert response.status == 200
    assert response.headers["X-Consul-Index"] == str(index)


# --------------------------------------------------------------------------- CA leaves


async def test_leaf_has_consul_shape_and_is_a_valid_svid(env: Env) -> None:
    response = await env.client.get("/v1/agent/connect/ca/leaf/web")
    assert response.status == 200, await response.text()
    leaf = await response.json()
    assert set(leaf) == {
        "SerialNumber",
        "CertPEM",
        "PrivateKeyPEM",
        "Service",
        "ServiceURI",
        "ValidAfter",
        "ValidBefore",
        "CreateIndex",
        "ModifyIndex",
    }
    assert leaf["Service"] == "web"
    assert leaf["ServiceURI"] == service_uri("web")
    assert response.headers["X-Consul-Index"] == str(leaf["ModifyIndex"])
    assert leaf["CreateIndex"] == leaf["ModifyIndex"] >= 1
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    # Colon hex of the serial's big-endian bytes, as Consul's HexString(serial.Bytes()).
    digits = f"{cert.serial_number:x}"
    digits = "0" * (len(digits) % 2) + digits
    assert leaf["SerialNumber"] == ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
    assert leaf["ValidAfter"] == rfc3339(cert.not_valid_before_utc)
    assert leaf["ValidBefore"] == rfc3339(cert.not_valid_after_utc)
    key = serialization.load_pem_private_key(leaf["PrivateKeyPEM"].encode(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    identity = verify_leaf(leaf["CertPEM"], [], env.connect.ca.bundle(), now())
    assert identity.uri == service_uri("web")

    # Asking again gives the same leaf: it is cached until renewal.
    again = await env.get_json("/v1/agent/connect/ca/leaf/web")
    assert again["SerialNumber"] == leaf["SerialNumber"]


async def test_leaf_of_a_service_not_registered_here_is_404(env: Env) -> None:
    await env.refused(env.client.get("/v1/agent/connect/ca/leaf/billing"), 404, "'billing'")


async def test_blocking_leaf_query_returns_the_renewed_leaf(env: Env) -> None:
    first = await env.get_json("/v1/agent/connect/ca/leaf/web")
    index = first["ModifyIndex"]
    blocked = asyncio.create_task(
        env.client.get(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10s")
    )
    await asyncio.sleep(0.1)
    env.connect.renew("api")  # another service's leaf: wakes the query, which waits on
    await asyncio.sleep(0.1)
    assert not blocked.done()
    env.connect.renew("web")
    response = await asyncio.wait_for(blocked, 5)
    renewed = await response.json()
    assert renewed["ModifyIndex"] > index
    assert response.headers["X-Consul-Index"] == str(renewed["ModifyIndex"])
    assert renewed["SerialNumber"] != first["SerialNumber"]
    assert renewed["PrivateKeyPEM"] != first["PrivateKeyPEM"]


async def test_blocking_leaf_query_returns_a_leaf_of_the_new_root_after_rotation(
    env: Env,
) -> None:
    first = await env.get_json("/v1/agent/connect/ca/leaf/web")
    index = first["ModifyIndex"]
    blocked = asyncio.create_task(
        env.client.get(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10s")
    )
    await asyncio.sleep(0.1)
    new_root = (await env.ok(env.put("/v1/mesh/ca/rotate")))["ActiveRootID"]
    response = await asyncio.wait_for(blocked, 5)
    reissued = await response.json()
    assert reissued["ModifyIndex"] > index
    assert reissued["SerialNumber"] != first["SerialNumber"]
    # Leaf plus the cross-signed new root: it verifies for peers on either bundle.
    chain = x509.load_pem_x509_certificates(reissued["CertPEM"].encode())
    assert len(chain) == 2
    bundle = env.connect.ca.bundle()
    assert bundle.active_root_id == new_root
    assert verify_leaf(reissued["CertPEM"], [], bundle, now()).uri == service_uri("web")


async def test_blocking_leaf_query_times_out_with_the_same_leaf_and_index(env: Env) -> None:
    first = await env.get_json("/v1/agent/connect/ca/leaf/web")
    index = first["ModifyIndex"]
    started = time.monotonic()
    response = await env.client.get(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=100ms")
    assert time.monotonic() - started >= 0.1
    assert response.headers["X-Consul-Index"] == str(index)
    assert (await response.json())["SerialNumber"] == first["SerialNumber"]


async def test_leaf_query_with_an_older_index_answers_at_once(env: Env) -> None:
    first = await env.get_json("/v1/agent/connect/ca/leaf/web")
    started = time.monotonic()
    leaf = await env.get_json(
        f"/v1/agent/connect/ca/leaf/web?index={first['ModifyIndex'] - 1}&wait=10s"
    )
    assert leaf["SerialNumber"] == first["SerialNumber"]
    # An index from before a restart (above anything handed out) also answers at once.
    await env.get_json("/v1/agent/connect/ca/leaf/web?index=999999&wait=10s")
    assert time.monotonic() - started < 5


async def test_leaf_wait_must_parse(env: Env) -> None:
    await env.refused(
        env.client.get("/v1/agent/connect/ca/leaf/web?index=1&wait=soon"), 400, "Invalid wait"
    )


async def test_shutdown_wakes_a_blocked_leaf_query() -> None:
    catalog = Catalog(NodeInfo("node1", "id-node1", "127.0.0.1", "dc1"))
    connect = InProcessConnect()
    app = build_app(
        FakeAgent(catalog),
        catalog,
        acl=AclConfig(),
        registry=CollectorRegistry(),
        datacenter="dc1",
        node_name="node1",
        connect=connect,
    )
    runner, port = await serve(app, "127.0.0.1", 0)
    assert len(connect.listeners) == 1  # subscribed while the app runs
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{port}/v1/agent/connect/ca/leaf/web"
        async with session.get(base) as response:
            index = (await response.json())["ModifyIndex"]

        async def blocked() -> int:
            async with session.get(f"{base}?index={index}") as response:
                return response.status

        task = asyncio.create_task(blocked())
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await runner.cleanup()  # the default wait is 5 minutes
        assert time.monotonic() - started < 5
        assert await asyncio.wait_for(task, 5) == 200
    assert connect.listeners == []  # and unsubscribed after


# --------------------------------------------------------------------------- authorize


async def test_authorize_by_exact_intentions(env: Env) -> None:
    await env.intention("web", "db", Action="allow")
    await env.intention("api", "db", Action="deny")
    allowed = await env.authorize("db", service_uri("web"))
    assert allowed == {"Authorized": True, "Reason": "Matched L4 intention: web => db (allow)"}
    denied = await env.authorize("db", service_uri("api"))
    assert denied == {"Authorized": False, "Reason": "Matched L4 intention: api => db (deny)"}


async def test_authorize_falls_back_to_the_default_policy(env: Env) -> None:
    denied = await env.authorize("db", service_uri("web"))
    assert denied["Authorized"] is False
    assert "Default behavior" in denied["Reason"] and "deny" in denied["Reason"]
    env.connect.default_policy = "allow"
    allowed = await env.authorize("db", service_uri("web"))
    assert allowed["Authorized"] is True and "allow" in allowed["Reason"]


async def test_authorize_with_wildcard_intentions_follows_precedence(env: Env) -> None:
    env.connect.default_policy = "allow"
    await env.intention("*", "db", Action="deny")
    await env.intention("web", "db", Action="allow")
    await env.intention("*", "*", Action="deny")
    # web => db (precedence 9) beats * => db (8).
    assert (await env.authorize("db", service_uri("web")))["Authorized"] is True
    api_db = await env.authorize("db", service_uri("api"))
    assert api_db == {"Authorized": False, "Reason": "Matched L4 intention: * => db (deny)"}
    # * => * catches everything else, before the default policy.
    web_api = await env.authorize("api", service_uri("web"))
    assert web_api == {"Authorized": False, "Reason": "Matched L4 intention: * => * (deny)"}


async def test_authorize_denies_on_an_l7_intention(env: Env) -> None:
    env.connect.default_policy = "allow"
    await env.config({"Kind": "service-defaults", "Name": "db", "Protocol": "http"})
    await env.intention(
        "web",
        "db",
        Permissions=[{"Action": "allow", "HTTP": {"PathPrefix": "/read"}}],
    )
    result = await env.authorize("db", service_uri("web"))
    assert result["Authorized"] is False
    assert result["Reason"].startswith("Matched L7 intention: web => db (L7)")


async def test_authorize_refuses_another_trust_domain(env: Env) -> None:
    env.connect.default_policy = "allow"
    result = await env.authorize("db", service_uri("web", OTHER_DOMAIN))
    assert result["Authorized"] is False
    assert OTHER_DOMAIN in result["Reason"] and "trust domain" in result["Reason"]


async def test_authorize_bad_requests(env: Env) -> None:
    path = "/v1/agent/connect/authorize"
    await env.refused(env.post(path, {"ClientCertURI": service_uri("web")}), 400, "Target")
    await env.refused(env.post(path, {"Target": "db"}), 400, "ClientCertURI")
    await env.refused(
        env.post(path, {"Target": "db", "ClientCertURI": "https://web"}),
        400,
        "ClientCertURI",
        "not a valid SPIFFE ID",
    )
    agent_uri = SpiffeId.agent(TRUST_DOMAIN, "dc1", "node1").uri
    await env.refused(
        env.post(path, {"Target": "db", "ClientCertURI": agent_uri}), 400, "service identity"
    )
    await env.refused(env.post(path, {"Target": 7, "ClientCertURI": "x"}), 400, "Target")
    await env.refused(env.client.post(path, data="{not json"), 400, "Request decode failed")


async def test_authorize_before_the_bundle_arrives_is_503(env: Env) -> None:
    env.connect.bundle_arrived = False
    body = {"Target": "db", "ClientCertURI": service_uri("web")}
    await env.refused(env.post("/v1/agent/connect/authorize", body), 503, "CA not initialized")


# --------------------------------------------------------------------------- intentions


async def test_intention_exact_upsert_read_and_delete(env: Env) -> None:
    await env.intention("web", "db", Action="allow", Description="web reads db", Meta={"k": "v"})
    response = await env.client.get("/v1/connect/intentions/exact?source=web&destination=db")
    assert response.status == 200
    got = await response.json()
    assert got["ID"] == intention_id("web", "db")
    assert (got["SourceName"], got["DestinationName"], got["Action"]) == ("web", "db", "allow")
    assert got["Description"] == "web reads db" and got["Meta"] == {"k": "v"}
    assert got["Precedence"] == 9 and got["SourceType"] == "consul"
    assert response.headers["X-Consul-Index"] == str(got["ModifyIndex"])
    created = got["CreateIndex"]

    await env.intention("web", "db", Action="deny")  # upsert
    changed = await env.get_json("/v1/connect/intentions/exact?source=web&destination=db")
    assert changed["Action"] == "deny"
    assert changed["CreateIndex"] == created < changed["ModifyIndex"]

    path = "/v1/connect/intentions/exact?source=web&destination=db"
    assert await env.ok(env.client.delete(path)) is True
    await env.refused(env.client.get(path), 404, "not found")
    assert await env.ok(env.client.delete(path)) is True  # nothing left: still true


async def test_intention_exact_needs_both_names(env: Env) -> None:
    await env.refused(
        env.client.get("/v1/connect/intentions/exact?source=web"), 400, "'destination'"
    )
    await env.refused(
        env.put("/v1/connect/intentions/exact?destination=db", {"Action": "allow"}),
        400,
        "'source'",
    )


async def test_intention_bodies_are_validated(env: Env) -> None:
    path = "/v1/connect/intentions/exact?source=web&destination=db"
    await env.refused(env.put(path, {"Action": "maybe"}), 400, "Action", "'allow' or 'deny'")
    await env.refused(env.put(path, {"Action": "allow", "SourceName": "api"}), 400, "SourceName")
    await env.refused(env.put(path, data="[1, 2"), 400, "Request decode failed")
    await env.refused(env.put(path, ["allow"]), 400, "expected a JSON object")
    # L7 permissions on a service that does not speak http.
    l7 = {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}
    await env.refused(env.put(path, l7), 400, "Permissions", "protocol 'http'")
    assert env.connect.tokens_seen == []  # refused before reaching the leader
    assert env.connect.policy.intentions() == []


async def test_intentions_list_in_precedence_order(env: Env) -> None:
    await env.intention("*", "*", Action="deny")
    await env.intention("web", "*", Action="allow")
    await env.intention("*", "db", Action="deny")
    await env.intention("web", "db", Action="allow")
    response = await env.client.get("/v1/connect/intentions")
    listed = await response.json()
    pairs = [(i["SourceName"], i["DestinationName"], i["Precedence"]) for i in listed]
    assert pairs == [("web", "db", 9), ("*", "db", 8), ("web", "*", 6), ("*", "*", 5)]
    kind_index = env.connect.policy.kind_index(KIND_INTENTION)
    assert response.headers["X-Consul-Index"] == str(kind_index)
    await env.refused(env.client.get("/v1/connect/intentions?filter=x"), 400, "filter")


async def test_blocking_intentions_list(env: Env) -> None:
    await env.intention("web", "db")
    response = await env.client.get("/v1/connect/intentions")
    index = int(response.headers["X-Consul-Index"])

    timed_out = await env.client.get(f"/v1/connect/intentions?index={index}&wait=50ms")
    assert timed_out.headers["X-Consul-Index"] == str(index)

    blocked = asyncio.create_task(env.client.get(f"/v1/connect/intentions?index={index}&wait=10s"))
    await asyncio.sleep(0.1)
    await env.config(HTTP_WEB)  # another kind: wakes the query, which waits on
    await asyncio.sleep(0.1)
    assert not blocked.done()
    await env.intention("api", "db")
    answered = await asyncio.wait_for(blocked, 5)
    assert int(answered.headers["X-Consul-Index"]) > index
    assert len(await answered.json()) == 2


async def test_legacy_create_read_update_delete_by_id(env: Env) -> None:
    body = {"SourceName": "web", "DestinationName": "db", "Action": "allow"}
    created = await env.ok(env.post("/v1/connect/intentions", body))
    assert created == {"ID": intention_id("web", "db")}
    path = f"/v1/connect/intentions/{created['ID']}"
    got = await env.get_json(path)
    assert got["Action"] == "allow" and got["ID"] == created["ID"]

    # The same pair again is refused as Consul refuses it (status and text).
    await env.refused(
        env.post("/v1/connect/intentions", body), 500, "duplicate intention found: web => db"
    )

    # Update by ID; the names may be left out, but not changed.
    assert await env.ok(env.put(path, {"Action": "deny", "Description": "no"})) == created
    got = await env.get_json(path)
    assert (got["Action"], got["Description"]) == ("deny", "no")
    moved = {"SourceName": "api", "DestinationName": "db", "Action": "deny"}
    await env.refused(env.put(path, moved), 400, "cannot change SourceName")

    assert await env.ok(env.client.delete(path)) is True
    await env.refused(env.client.get(path), 404, "Intention not found")
    await env.refused(env.client.delete(path), 404, "Intention not found")
    await env.refused(env.put(path, {"Action": "allow"}), 404, "Intention not found")


async def test_intention_check(env: Env) -> None:
    await env.intention("web", "db", Action="allow")
    check = "/v1/connect/intentions/check"
    assert await env.get_json(f"{check}?source=web&destination=db") == {"Allowed": True}
    assert await env.get_json(f"{check}?source=api&destination=db") == {"Allowed": False}
    env.connect.default_policy = "allow"
    assert await env.get_json(f"{check}?source=api&destination=db") == {"Allowed": True}
    await env.refused(env.client.get(f"{check}?source=web"), 400, "'destination'")


async def test_intention_match(env: Env) -> None:
    await env.intention("web", "db")
    await env.intention("*", "db", Action="deny")
    await env.intention("web", "api")
    by_destination = await env.get_json("/v1/connect/intentions/match?by=destination&name=db")
    assert list(by_destination) == ["db"]
    assert [i["SourceName"] for i in by_destination["db"]] == ["web", "*"]
    by_source = await env.get_json("/v1/connect/intentions/match?by=source&name=web&name=billing")
    # Wildcards apply too: * => db is among web's (and any service's) as a source.
    pairs = [(i["SourceName"], i["DestinationName"]) for i in by_source["web"]]
    assert pairs == [("web", "api"), ("web", "db"), ("*", "db")]
    assert [i["SourceName"] for i in by_source["billing"]] == ["*"]
    await env.refused(env.client.get("/v1/connect/intentions/match?by=both&name=db"), 400, "'by'")
    await env.refused(env.client.get("/v1/connect/intentions/match?by=source"), 400, "'name'")


# --------------------------------------------------------------------------- config entries


async def test_config_entries_write_list_get_delete(env: Env) -> None:
    await env.config(HTTP_WEB)
    await env.config(RESOLVER_WEB)
    await env.config(SPLITTER_WEB)

    splitter = await env.get_json("/v1/config/service-splitter/web")
    assert splitter["Kind"] == "service-splitter" and splitter["Name"] == "web"
    assert [s["Weight"] for s in splitter["Splits"]] == [90, 10]
    assert splitter["CreateIndex"] == splitter["ModifyIndex"] >= 1

    response = await env.client.get("/v1/config/service-defaults")
    listed = await response.json()
    assert [(e["Kind"], e["Name"], e["Protocol"]) for e in listed] == [
        ("service-defaults", "web", "http")
    ]
    assert response.headers["X-Consul-Index"] == str(
        env.connect.policy.kind_index("service-defaults")
    )
    assert await env.get_json("/v1/config/service-router") == []

    # The resolver cannot go while the splitter uses its subsets.
    await env.refused(
        env.client.delete("/v1/config/service-resolver/web"), 400, "service-splitter 'web'"
    )
    assert await env.ok(env.client.delete("/v1/config/service-splitter/web")) is True
    assert await env.ok(env.client.delete("/v1/config/service-resolver/web")) is True
    await env.refused(
        env.client.get("/v1/config/service-resolver/web"),
        404,
        "Config entry not found for 'service-resolver' / 'web'",
    )


async def test_config_entry_errors_name_what_is_wrong(env: Env) -> None:
    await env.refused(env.put("/v1/config", data="{"), 400, "Request decode failed")
    await env.refused(env.put("/v1/config", {**HTTP_WEB, "Bogus": 1}), 400, "Bogus")
    await env.config(HTTP_WEB)
    await env.config(RESOLVER_WEB)
    ninety = {**SPLITTER_WEB, "Splits": [{"Weight": 90, "ServiceSubset": "v1"}]}
    await env.refused(env.put("/v1/config", ninety), 400, "Splits", "must be 100, not 90")
    missing = {
        **SPLITTER_WEB,
        "Splits": [{"Weight": 50, "ServiceSubset": "v1"}, {"Weight": 50, "ServiceSubset": "v3"}],
    }
    await env.refused(
        env.put("/v1/config", missing),
        400,
        "Splits[1].ServiceSubset",
        "subset 'v3' is not defined by the service-resolver of 'web'",
    )
    kinds = "service-defaults, service-resolver, service-splitter, service-router"
    await env.refused(env.put("/v1/config", {"Kind": "mesh", "Name": "mesh"}), 400, "'mesh'", kinds)
    await env.refused(env.client.get("/v1/config/proxy-defaults"), 400, kinds)
    await env.refused(env.client.get("/v1/config/intention/web"), 400, kinds)
    await env.refused(env.client.delete("/v1/config/mesh/x"), 400, kinds)
    await env.refused(env.put("/v1/config", {"Name": "web"}), 400, "Kind")
    assert env.connect.policy.config_entries("service-splitter") == []


async def test_config_cas(env: Env) -> None:
    assert await env.ok(env.put("/v1/config?cas=0", HTTP_WEB)) is True
    assert await env.ok(env.put("/v1/config?cas=0", HTTP_WEB)) is False  # exists now
    modify = (await env.get_json("/v1/config/service-defaults/web"))["ModifyIndex"]
    tcp = {**HTTP_WEB, "Protocol": "tcp"}
    assert await env.ok(env.put(f"/v1/config?cas={modify + 1}", tcp)) is False
    assert await env.ok(env.put(f"/v1/config?cas={modify}", tcp)) is True
    entry = await env.get_json("/v1/config/service-defaults/web")
    assert entry["Protocol"] == "tcp"
    path = "/v1/config/service-defaults/web"
    assert await env.ok(env.client.delete(f"{path}?cas={modify}")) is False
    assert await env.ok(env.client.delete(f"{path}?cas={entry['ModifyIndex']}")) is True
    await env.refused(env.put("/v1/config?cas=abc", HTTP_WEB), 400, "cas")


async def test_blocking_config_entry_read(env: Env) -> None:
    await env.config(HTTP_WEB)
    response = await env.client.get("/v1/config/service-defaults/web")
    index = int(response.headers["X-Consul-Index"])
    blocked = asyncio.create_task(
        env.client.get(f"/v1/config/service-defaults/web?index={index}&wait=10s")
    )
    await asyncio.sleep(0.1)
    assert not blocked.done()
    await env.config({**HTTP_WEB, "Protocol": "tcp"})
    answered = await asyncio.wait_for(blocked, 5)
    assert int(answered.headers["X-Consul-Index"]) > index
    assert (await answered.json())["Protocol"] == "tcp"


# --------------------------------------------------------------------------- no leader, tokens


async def test_without_a_leader_writes_are_503_and_reads_go_on(env: Env) -> None:
    await env.intention("web", "db", Action="allow")
    await env.config(HTTP_WEB)
    await env.get_json("/v1/agent/connect/ca/leaf/web")
    env.connect.has_leader = False

    exact = "/v1/connect/intentions/exact?source=api&destination=db"
    for write in (
        env.put(exact, {"Action": "allow"}),
        env.client.delete("/v1/connect/intentions/exact?source=web&destination=db"),
        env.post(
            "/v1/connect/intentions",
            {"SourceName": "api", "DestinationName": "db", "Action": "allow"},
        ),
        env.put("/v1/config", RESOLVER_WEB),
        env.client.delete("/v1/config/service-defaults/web"),
        env.put("/v1/mesh/ca/rotate"),
    ):
        await env.refused(write, 503, "No cluster leader")
    # A service without a leaf yet cannot get one; one that has a leaf keeps it.
    await env.refused(env.client.get("/v1/agent/connect/ca/leaf/api"), 503, "No cluster leader")

    assert len(await env.get_json("/v1/connect/intentions")) == 1
    assert await env.get_json("/v1/connect/intentions/check?source=web&destination=db") == {
        "Allowed": True
    }
    assert (await env.authorize("db", service_uri("web")))["Authorized"] is True
    assert len(await env.get_json("/v1/config/service-defaults")) == 1
    await env.get_json("/v1/agent/connect/ca/roots")
    await env.get_json("/v1/agent/connect/ca/leaf/web")
    await env.get_json("/v1/mesh/ca/status")


async def test_the_leader_refusing_the_token_is_403(env: Env) -> None:
    env.connect.leader_token = "leader-secret-0000"
    exact = "/v1/connect/intentions/exact?source=web&destination=db"
    wrong = {"X-Consul-Token": "not-the-one"}
    await env.refused(env.put(exact, {"Action": "allow"}, headers=wrong), 403, "Permission denied")
    await env.refused(env.put("/v1/mesh/ca/rotate", headers=wrong), 403, "Permission denied")
    await env.refused(env.put("/v1/config", HTTP_WEB), 403, "Permission denied")  # no token
    assert env.connect.tokens_seen == ["not-the-one", "not-the-one", None]

    right = {"X-Consul-Token": "leader-secret-0000"}
    assert await env.ok(env.put(exact, {"Action": "allow"}, headers=right)) is True
    assert await env.ok(env.put("/v1/config?token=leader-secret-0000", HTTP_WEB)) is True


async def test_a_refused_rotation_is_400(env: Env) -> None:
    env.connect.operator_ca = True
    await env.refused(env.put("/v1/mesh/ca/rotate"), 400, "operator CA")


async def test_ca_status(env: Env) -> None:
    await env.get_json("/v1/agent/connect/ca/leaf/web")
    status = await env.get_json("/v1/mesh/ca/status")
    [agent] = status["Agents"]
    assert agent["BundleFingerprint"] == env.connect.ca.bundle().fingerprint()
    assert agent["Lagging"] is False and agent["SoonestLeafExpiry"]


async def test_acl_authorize_needs_no_token_but_writes_and_leaves_do(
    make_env: EnvFactory,
) -> None:
    env = await make_env(AclConfig(enabled=True, token=TOKEN))
    # authorize is a read, even though it is a POST.
    result = await env.authorize("db", service_uri("web"))
    assert result["Authorized"] is False

    exact = "/v1/connect/intentions/exact?source=web&destination=db"
    await env.refused(env.put(exact, {"Action": "allow"}), 403, "Permission denied")
    assert env.connect.tokens_seen == []  # stopped before the leader was asked
    auth = {"X-Consul-Token": TOKEN}
    assert await env.ok(env.put(exact, {"Action": "allow"}, headers=auth)) is True
    assert env.connect.tokens_seen == [TOKEN]
    await env.refused(env.client.delete(exact), 403, "Permission denied")
    await env.refused(env.put("/v1/mesh/ca/rotate"), 403, "Permission denied")
    await env.refused(env.put("/v1/config", HTTP_WEB), 403, "Permission denied")

    # Reads stay open, except leaves: they carry a private key.
    assert len(await env.get_json("/v1/connect/intentions")) == 1
    await env.get_json("/v1/agent/connect/ca/roots")
    await env.refused(env.client.get("/v1/agent/connect/ca/leaf/web"), 403, "Permission denied")
    await env.get_json("/v1/agent/connect/ca/leaf/web", headers=auth)
