"""The CA service's refusals, driven through real ``Rpc`` pairs on an in-memory network.

What the HTTP API cannot show (an agent only ever asks for leaves of its own services):
the leader refuses a CSR for a service not registered on the requesting node, or one
naming another identity; a follower refuses to sign; policy writes need the ACL token;
a policy entry signed by another CA is refused and counted; CA state goes only to
servers, sealed so that only the asking server can open it.

Each node is what the agent builds (``meshnode.agent``): an ``Rpc``, and on servers a
``CaServer`` over a real ``DataDir``, ``BundleStore`` and ``PolicyStore`` whose verifier
is the bundle. Messages travel on the next loop turn, as on the gossip transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ca.bundle import CaState, TrustBundle, verify_leaf
from ca.issuer import CertificateAuthority, generate_key, make_csr
from ca.sealing import SealError, load_private_key, new_private_key, public_key_bytes, unseal
from ca.spiffe import SpiffeId
from gossip.broadcast import BroadcastQueue
from meshnode import authority
from meshnode.authority import CA_STATE_FILE, SEAL_KEY_FILE, CaServer, CaSettings, _aad
from meshnode.certs import BundleStore
from meshnode.persistence import DataDir
from meshnode.policy import (
    KIND_INTENTION,
    HlcTimestamp,
    PolicyEntry,
    PolicyStore,
    Version,
    decode_entry,
    intention_key,
    parse_intention,
    sign_entry,
    signing_payload,
    value_to_body,
)
from meshnode.rpc import Address, Rpc, RpcError

DATACENTER = "dc1"
CLUSTER = "authority-test"
TOKEN = "a-token-of-sixteen-or-more-characters"
SERVERS = ("s1", "s2")


class Network:
    """Delivers messages between ``Rpc`` instances by address on the next loop turn
    (as the gossip transport does); answers go where ``resolve`` says the node is."""

    def __init__(self) -> None:
        self.nodes: dict[Address, Rpc] = {}
        self.addresses: dict[str, Address] = {}

    def add(self, name: str) -> Rpc:
        address = ("127.0.0.1", 7000 + len(self.nodes))

        def send(to: Address, payload: bytes) -> None:
            if to in self.nodes:
                asyncio.get_running_loop().call_soon(self.nodes[to].receive, payload)

        rpc = Rpc(name, send, self.addresses.get, random.Random(len(self.nodes)))
        self.nodes[address] = rpc
        self.addresses[name] = address
        return rpc


@dataclass
class Server:
    """One server's CA service and the stores it shares with its agent."""

    rpc: Rpc
    data_dir: DataDir
    bundles: BundleStore
    policy: PolicyStore
    ca: CaServer
    task: asyncio.Task[None] | None = None


@dataclass
class Cluster:
    network: Network
    leader: str
    registrations: set[tuple[str, str]]
    servers: dict[str, Server] = field(default_factory=dict)
    clients: dict[str, Rpc] = field(default_factory=dict)

    def address(self, node: str) -> Address:
        return self.network.addresses[node]

    def registered(self, node: str, service: str) -> bool:
        """The catalog's answer (``Agent._service_registered_on``): for the agent's
        own identity (``""``), whether the node is a member."""
        if not service:
            return node in self.network.addresses
        return (node, service) in self.registrations

    @property
    def authority(self) -> CertificateAuthority:
        authority = self.servers[self.leader].ca.authority
        assert authority is not None
        return authority

    @property
    def bundle(self) -> TrustBundle:
        bundle = self.servers[self.leader].bundles.bundle
        assert bundle is not None
        return bundle

    def start(self, name: str) -> None:
        server = self.servers[name]
        server.task = asyncio.get_running_loop().create_task(server.ca.run())

    async def sign(self, node: str, service: str, identity: SpiffeId, to: str = "") -> Any:
        """``node`` asks ``to`` (the leader by default) to sign a CSR for ``identity``
        as a leaf of ``service``, as ``LeafManager`` does."""
        csr = make_csr(generate_key(), identity)
        rpc = self.rpc(node)
        return await rpc.call(
            self.address(to or self.leader), "ca.sign", {"service": service, "csr": csr}
        )

    def rpc(self, node: str) -> Rpc:
        return self.servers[node].rpc if node in self.servers else self.clients[node]

    def service_id(self, service: str) -> SpiffeId:
        return SpiffeId.service(self.bundle.trust_domain, DATACENTER, service)


def make_server(cluster: Cluster, name: str, tmp_path: Path, *, acl_token: str | None) -> Server:
    rpc = cluster.network.add(name)
    data_dir = DataDir(tmp_path / name)
    data_dir.ensure()
    bundles = BundleStore(data_dir, BroadcastQueue(4, lambda: 3))
    policy = PolicyStore(bundles.verify)
    loop = asyncio.get_running_loop()

    def servers() -> Iterable[tuple[str, Address]]:
        return [(server, cluster.address(server)) for server in SERVERS]

    def publish(bundle: TrustBundle) -> None:
        bundles.apply(bundle, authoritative=True)

    ca = CaServer(
        CaSettings(
            node=name,
            datacenter=DATACENTER,
            cluster=CLUSTER,
            leaf_ttl=timedelta(hours=72),
            acl_enabled=acl_token is not None,
            acl_token=acl_token,
        ),
        rpc=rpc,
        data_dir=data_dir,
        policy=policy,
        is_leader=lambda: cluster.leader == name,
        term=lambda: 1,
        leader_address=lambda: cluster.address(cluster.leader),
        servers=servers,
        is_server=lambda node: node in SERVERS,
        registered=cluster.registered,
        known_bundle=lambda: bundles.bundle,
        publish_bundle=publish,
        monotonic=loop.time,
    )
    # The agent tells its CA service about every bundle change (Agent._bundle_changed).
    bundles.on_change(ca.bundle_seen)
    return Server(rpc, data_dir, bundles, policy, ca)


async def wait_for(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def short_registration_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader waits REGISTRATION_GRACE (2 s) for a registration it has not seen
    before refusing; shortened so that refusals do not take seconds here."""
    monkeypatch.setattr(authority, "REGISTRATION_GRACE", 0.2)


@contextlib.asynccontextmanager
async def build(tmp_path: Path, *, acl_token: str | None = None) -> AsyncIterator[Cluster]:
    """s1 leads with a fresh root; s2 follows (its loop not started); c1 and c2 are
    clients with web on c1 and api on c2."""
    cluster = Cluster(Network(), "s1", {("c1", "web"), ("c2", "api")})
    for name in SERVERS:
        cluster.servers[name] = make_server(cluster, name, tmp_path, acl_token=acl_token)
    for name in ("c1", "c2"):
        cluster.clients[name] = cluster.network.add(name)
    try:
        cluster.start("s1")
        await wait_for(lambda: cluster.servers["s1"].ca.authority is not None, "a CA on s1")
        yield cluster
    finally:
        for server in cluster.servers.values():
            if server.task is not None:
                server.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server.task
            server.ca.close()
        for rpc in cluster.network.nodes.values():
            await rpc.aclose()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with build(tmp_path) as built:
        yield built


@pytest.fixture
async def acl_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with build(tmp_path, acl_token=TOKEN) as built:
        yield built


async def refusal(call: Any) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await call
    return caught.value


# ----------------------------------------------------------------------------- ca.sign


async def test_the_leader_signs_a_csr_for_a_service_registered_on_the_requesting_node(
    cluster: Cluster,
) -> None:
    answer = await cluster.sign("c1", "web", cluster.service_id("web"))
    identity = verify_leaf(answer["cert"], answer["chain"], cluster.bundle, datetime.now(UTC))
    assert identity == cluster.service_id("web")
    assert answer["root"] == cluster.bundle.active_root_id
    assert cluster.servers["s1"].ca.stats["signed"] == 1


async def test_a_csr_for_a_service_not_registered_on_the_requesting_node_is_refused(
    cluster: Cluster,
) -> None:
    # api is registered - on c2. c1 asking for it is refused, with a well-formed CSR.
    error = await refusal(cluster.sign("c1", "api", cluster.service_id("api")))
    assert error.code == "not_registered"
    assert "api" in error.message
    error = await refusal(cluster.sign("c1", "billing", cluster.service_id("billing")))
    assert error.code == "not_registered"
    stats = cluster.servers["s1"].ca.stats
    assert (stats["signed"], stats["refused"]) == (0, 2)


async def test_a_registration_arriving_within_the_grace_is_signed(cluster: Cluster) -> None:
    """An agent asks for a leaf as soon as a service is registered there, usually before
    gossip has brought the registration to the leader."""
    asyncio.get_running_loop().call_later(0.05, cluster.registrations.add, ("c1", "late"))
    answer = await cluster.sign("c1", "late", cluster.service_id("late"))
    identity = verify_leaf(answer["cert"], answer["chain"], cluster.bundle, datetime.now(UTC))
    assert identity == cluster.service_id("late")


async def test_a_csr_whose_spiffe_id_names_another_identity_is_refused(
    cluster: Cluster,
) -> None:
    # c1 has web registered, asks for a web leaf, but the CSR carries api's ID.
    error = await refusal(cluster.sign("c1", "web", cluster.service_id("api")))
    assert error.code == "id_mismatch"
    # The agent identity ("" service) must be the requesting node's own.
    other_agent = SpiffeId.agent(cluster.bundle.trust_domain, DATACENTER, "c2")
    error = await refusal(cluster.sign("c1", "", other_agent))
    assert error.code == "id_mismatch"
    # Another trust domain is refused before the identity is compared.
    foreign = SpiffeId.service("other.meshnode", DATACENTER, "web")
    error = await refusal(cluster.sign("c1", "web", foreign))
    assert error.code == "wrong_trust_domain"
    assert cluster.servers["s1"].ca.stats["signed"] == 0


async def test_a_follower_does_not_sign(cluster: Cluster) -> None:
    error = await refusal(cluster.sign("c1", "web", cluster.service_id("web"), to="s2"))
    assert error.code == "not_leader"
    assert cluster.servers["s2"].ca.stats["signed"] == 0


async def test_a_malformed_sign_request_is_refused(cluster: Cluster) -> None:
    rpc = cluster.clients["c1"]
    for body in ({"service": "web"}, {"service": 5, "csr": "x"}, ["web"]):
        error = await refusal(rpc.call(cluster.address("s1"), "ca.sign", body))
        assert error.code == "malformed", body
    error = await refusal(
        rpc.call(cluster.address("s1"), "ca.sign", {"service": "web", "csr": "not a csr"})
    )
    assert error.code == "malformed"


# ----------------------------------------------------------------------------- policy


def intention_write(action: str, token: str | None = None) -> dict[str, Any]:
    value = parse_intention({"Action": action}, source="web", destination="api")
    body: dict[str, Any] = {"kind": value.kind, "name": value.name, "body": value_to_body(value)}
    if token is not None:
        body["token"] = token
    return body


async def test_policy_writes_need_the_token_when_acls_are_on(acl_cluster: Cluster) -> None:
    leader = acl_cluster.address("s1")
    rpc = acl_cluster.clients["c1"]
    store = acl_cluster.servers["s1"].policy
    for token in (None, "", "wrong-token-wrong-token"):
        error = await refusal(rpc.call(leader, "policy.write", intention_write("deny", token)))
        assert error.code == "permission_denied", token
    delete = {"kind": KIND_INTENTION, "name": intention_key("web", "api")}
    error = await refusal(rpc.call(leader, "policy.delete", delete))
    assert error.code == "permission_denied"
    error = await refusal(rpc.call(leader, "ca.rotate", {}))
    assert error.code == "permission_denied"
    assert store.values() == {}
    assert acl_cluster.servers["s1"].ca.stats["rotations"] == 0

    answer = await rpc.call(leader, "policy.write", intention_write("deny", TOKEN))
    entry = decode_entry(answer["entry"])
    assert entry.key == (KIND_INTENTION, intention_key("web", "api"))
    # Signed with the CA key: it verifies against the bundle, and the leader applied it.
    assert acl_cluster.servers["s1"].bundles.verify(*signed_parts(entry))
    assert store.get(KIND_INTENTION, intention_key("web", "api")) == entry.value


def signed_parts(entry: PolicyEntry) -> tuple[bytes, bytes, str]:
    return signing_payload(entry), entry.signature, entry.key_id


async def test_a_follower_refuses_policy_writes(cluster: Cluster) -> None:
    rpc = cluster.clients["c1"]
    error = await refusal(rpc.call(cluster.address("s2"), "policy.write", intention_write("deny")))
    assert error.code == "not_leader"
    error = await refusal(rpc.call(cluster.address("s2"), "ca.rotate", {}))
    assert error.code == "not_leader"


async def test_an_entry_signed_by_another_ca_is_refused_and_counted(cluster: Cluster) -> None:
    store = cluster.servers["s1"].policy
    value = parse_intention({"Action": "allow"}, source="web", destination="api")
    version = Version(5, HlcTimestamp(int(time.time() * 1000), 0))
    unsigned = PolicyEntry.for_value(value, version)
    # Another CA of the same trust domain: a key the bundle does not hold.
    other = CertificateAuthority.create_root(cluster.bundle.trust_domain, datetime.now(UTC))
    forged = sign_entry(unsigned, other.sign_data)
    assert not store.apply(forged, 0.0)
    # The same forgery claiming our CA's key ID.
    genuine_key_id = cluster.authority.sign_data(b"")[1]
    assert forged.key_id != genuine_key_id
    assert not store.apply(replace(forged, key_id=genuine_key_id), 0.0)
    # A genuine entry whose body was changed after signing.
    genuine = sign_entry(unsigned, cluster.authority.sign_data)
    tampered_value = parse_intention({"Action": "deny"}, source="web", destination="api")
    tampered = replace(genuine, value=tampered_value, body=value_to_body(tampered_value))
    assert not store.apply(tampered, 0.0)
    assert store.stats["bad_signature"] == 3
    assert store.values() == {}
    # The genuine one is taken (the refusals were about the signatures, nothing else).
    assert store.apply(genuine, 0.0)
    assert store.get(KIND_INTENTION, intention_key("web", "api")) == value
    assert (store.stats["bad_signature"], store.stats["applied"]) == (3, 1)


# ----------------------------------------------------------------------------- ca.state


async def test_ca_state_goes_only_to_servers_sealed_for_the_asking_one(
    cluster: Cluster, tmp_path: Path
) -> None:
    leader = cluster.address("s1")
    error = await refusal(
        cluster.clients["c1"].call(
            leader, "ca.state", {"pub": public_key_bytes(new_private_key()), "version": 0}
        )
    )
    assert error.code == "not_server"

    # s2 asks with the public key of the seal key kept in its data_dir.
    raw_key = cluster.servers["s2"].data_dir.read_bytes(SEAL_KEY_FILE)
    assert raw_key is not None
    s2_key = load_private_key(raw_key)
    answer = await cluster.servers["s2"].rpc.call(
        leader, "ca.state", {"pub": public_key_bytes(s2_key), "version": 0}
    )
    sealed = answer["sealed"]
    state = CaState.from_bytes(unseal(s2_key, sealed, _aad(CLUSTER, "s2")))
    assert state == cluster.authority.state
    # Another server's key opens nothing, nor does s2's key for another recipient.
    with pytest.raises(SealError):
        unseal(new_private_key(), sealed, _aad(CLUSTER, "s2"))
    with pytest.raises(SealError):
        unseal(s2_key, sealed, _aad(CLUSTER, "s3"))
    # The root's private key is not in the clear on the wire.
    assert cluster.authority.state.active_root.signing_key_pem.encode() not in sealed
    # Up to date: nothing is sent again.
    answer = await cluster.servers["s2"].rpc.call(
        leader, "ca.state", {"pub": public_key_bytes(s2_key), "version": state.version}
    )
    assert "sealed" not in answer


async def test_a_follower_replicates_the_state_and_keeps_the_root(cluster: Cluster) -> None:
    follower = cluster.servers["s2"]
    root_id = cluster.bundle.active_root_id
    assert not follower.data_dir.read_bytes(CA_STATE_FILE)
    cluster.start("s2")
    await wait_for(lambda: follower.ca.state is not None, "s2 has the CA state")
    assert follower.ca.state == cluster.authority.state
    # Kept in its data_dir, readable by the owner only (DESIGN.md "Persistence").
    assert follower.data_dir.read_bytes(CA_STATE_FILE) == cluster.authority.state.to_bytes()
    assert (follower.data_dir.path / CA_STATE_FILE).stat().st_mode & 0o077 == 0
    assert follower.ca.stats["state_replicated"] == 1
    # s2 takes over: it signs under the same root, without creating one.
    cluster.leader = "s2"
    follower.ca.leadership_changed()
    await wait_for(lambda: follower.ca.authority is not None, "s2 leads with a CA")
    assert follower.ca.stats["roots_created"] == 0
    answer = await cluster.sign("c1", "web", cluster.service_id("web"))
    assert answer["root"] == root_id
    assert follower.ca.stats["signed"] == 1
