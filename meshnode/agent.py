"""The agent: the composition root that wires gossip, catalog, checks, API and disk.

Theory of operation
-------------------
``Agent.run()`` brings the parts up in dependency order and down in reverse:

1. the data directory (locked, so two agents cannot share it; a temp dir in ``--dev``)
   gives the node ID, our last registrations and the last members we knew;
2. the catalog starts from the persisted local record (a restarted agent serves its
   old registrations before it has rejoined anyone), then the service definitions of
   the configuration files are registered on top;
3. the gossip transport starts with the catalog as its delegate, so registrations ride
   on gossip and full state is repaired by push-pull;
4. the check runner runs our checks and writes their results into the catalog;
5. the HTTP API serves the Consul-compatible endpoints;
6. joining: ``retry_join`` addresses, else the saved members, and mDNS on a LAN.

Servers (``server = true``) also run the leader election (``meshnode.leadership``
drives the ``ca.election`` core): gossip member events of servers feed it, election
messages ride on gossip user datagrams tagged ``L``, and every member publishes in its
node metadata whether it is a server and, on servers, the leader it follows, which is
how clients answer ``/v1/status/leader``.

Member events update the catalog's ``serfHealth`` checks. Every local write is
persisted atomically and re-syncs the check runner. SIGTERM/SIGINT leave the cluster
gracefully (peers see *left*); SIGHUP reloads service definitions, checks and the
log level from the configuration files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import shutil
import signal
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgpack
import structlog
from prometheus_client import CollectorRegistry

from ca.bundle import TrustBundle
from ca.renewal import rotation_spread
from gossip.broadcast import BroadcastQueue
from gossip.events import (
    Event,
    JoinCompleted,
    LeaveCompleted,
    Member,
    MemberEvent,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberRecovered,
    MemberState,
    MemberSuspected,
    MemberUpdated,
    SuspicionRefuted,
)
from gossip.keyring import Envelope, Keyring, decode_key
from gossip.transport import GossipTransport, parse_host_port
from meshnode import api, systemd
from meshnode.authority import CaServer, CaSettings
from meshnode.catalog import (
    Catalog,
    CatalogDecodeError,
    CatalogDelegate,
    NodeRecord,
    decode_update,
    encode_record,
)
from meshnode.certs import BUNDLE_TAG, BundleStore, LeafManager
from meshnode.checks import CheckError, CheckRunner, CheckSpec
from meshnode.config import AgentConfig
from meshnode.connect import (
    LocalLeaf,
    NoLeaderError,
    PermissionDeniedError,
    RequestRefusedError,
)
from meshnode.discovery import MdnsDiscovery, RetryJoiner
from meshnode.errors import ConfigError
from meshnode.leadership import (
    ELECTION_TAG,
    ElectionDriver,
    decode_node_meta,
    encode_node_meta,
    format_address,
    leader_from_members,
    meta_is_server,
    servers_from_members,
)
from meshnode.logging import configure_logging
from meshnode.metrics import (
    ConnectStats,
    ProxyMetricsSource,
    register_catalog_metrics,
    register_connect_metrics,
    register_election_metrics,
    register_gossip_metrics,
    register_proxy_metrics,
)
from meshnode.model import (
    CheckDefinition,
    HealthStatus,
    NodeInfo,
    ValidationError,
    parse_registration,
)
from meshnode.persistence import DataDir, DataDirError
from meshnode.policy import (
    WIRE_TYPE as POLICY_WIRE_TYPE,
)
from meshnode.policy import (
    PolicyDecodeError,
    PolicyDelegate,
    PolicyEntry,
    PolicyStore,
    PolicyValue,
    decode_entry,
    decode_state,
)
from meshnode.proxy_control import SOCKET_NAME, ProxyControl, worker_command
from meshnode.rpc import REQUEST_TAG, RESPONSE_TAG, Address, Rpc, RpcError
from meshnode.sidecar import SnapshotInputs, build_snapshot, proxy_port_of, with_proxy_port
from proxy.snapshot import AccessLog, Snapshot

log = structlog.get_logger()

#: First byte of a keyring-change broadcast (catalog messages start with ``C``,
#: election messages with ``L``: ``meshnode.leadership.ELECTION_TAG``).
KEYRING_TAG: Final = b"K"
#: How often the agent reaps long-dead nodes, saves members and deregisters services
#: whose critical checks asked for it.
HOUSEKEEPING_INTERVAL: Final = 5.0
KEYRING_FILE: Final = "keyring.json"
POLICY_FILE: Final = "policy.bin"
#: Policy is written to disk at most this long after a change (batched).
POLICY_SAVE_DELAY: Final = 0.2
#: How long a write or CSR waits for a leader (elections take 1-2 s).
LEADER_WAIT: Final = 10.0
#: Largest catalog record sent along with a CSR (else the leader waits for gossip).
MAX_RECORD_IN_CSR: Final = 32 * 1024
#: Answers from the leader that mean "ask again (maybe another server)".
RETRY_CODES: Final = frozenset(
    {"not_leader", "no_ca", "timeout", "busy", "closed", "leader_changed"}
)
#: How often a pending request checks whether another leader has been elected.
LEADER_CHECK_INTERVAL: Final = 0.05
#: The leader's signing capacity assumed when spreading re-issues after a rotation:
#: under half of what ``bench/ca_issue.py`` measures end to end on a shared 2-core
#: machine (~480 certificates/s while signing; a bare signature is ~2,000/s, the rest
#: is the round trip), since the leader also serves renewals and registrations.
ASSUMED_SIGNING_RATE: Final = 200.0
#: A leaf with less than this share of the configured TTL left is "expiring soon":
#: renewals happen at 40-60 % of a leaf's life, so a healthy agent never gets there.
EXPIRING_SOON_SHARE: Final = 0.3
#: First bytes of the bundle fingerprint gossiped in node metadata.
META_BUNDLE_BYTES: Final = 8


def _describe(event: Event) -> tuple[str, dict[str, Any]]:
    """A structlog event name and fields for a gossip event."""
    names: dict[type, str] = {
        MemberJoined: "member_joined",
        MemberUpdated: "member_updated",
        MemberSuspected: "member_suspected",
        MemberRecovered: "member_recovered",
        MemberFailed: "member_failed",
        MemberLeft: "member_left",
        MemberReaped: "member_reaped",
    }
    if isinstance(event, SuspicionRefuted):
        return "suspicion_refuted", {"incarnation": event.incarnation, "accuser": event.accuser}
    if isinstance(event, JoinCompleted):
        return "join_completed", {"contacted": event.contacted}
    if isinstance(event, LeaveCompleted):
        return "leave_completed", {}
    member: Member = event.member
    fields = {
        "member": member.name,
        "address": f"{member.address[0]}:{member.address[1]}",
        "incarnation": member.incarnation,
    }
    if isinstance(event, MemberSuspected):
        fields["accuser"] = event.accuser
    return names.get(type(event), "member_event"), fields


class Agent:
    """One meshnode agent. ``await Agent(config).run()`` until stopped."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        reload: Callable[[], AgentConfig] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload
        self._rng = rng or random.Random()
        self._stop = asyncio.Event()
        self._stopped_by_leave = False
        self.registry = CollectorRegistry()
        self._data_dir: DataDir | None = None
        self._temp_dir: Path | None = None
        self._transport: GossipTransport | None = None
        self._catalog: Catalog | None = None
        self._runner: CheckRunner | None = None
        self._keyring: Keyring | None = None
        self._election: ElectionDriver | None = None  # servers only
        self._ca_server: CaServer | None = None  # servers only
        self._bundles: BundleStore | None = None
        self._policy: PolicyStore | None = None
        self._policy_delegate: PolicyDelegate | None = None
        self._leaves: LeafManager | None = None
        self._rpc: Rpc | None = None
        self._connect_listeners: list[Callable[[int], None]] = []
        self._policy_save: asyncio.TimerHandle | None = None
        self._published_meta = b""
        self._record_sent_version: int | None = None
        # A client's answer to "who leads" (from the servers' metadata), cached because
        # every HTTP response asks (X-Consul-KnownLeader); reset by member events.
        self._client_leader: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self.http_port: int | None = None
        self.gossip_port: int | None = None
        self._config_services: set[str] = set()
        self._proxy: ProxyControl | None = None
        self.proxy_port = 0
        """The inbound proxy port this agent publishes (0: no proxy)."""
        self._members_dirty = False
        self._joined = asyncio.Event()

    # ------------------------------------------------------------------ parts

    @property
    def catalog(self) -> Catalog:
        assert self._catalog is not None
        return self._catalog

    @property
    def transport(self) -> GossipTransport:
        assert self._transport is not None
        return self._transport

    @property
    def data_dir(self) -> DataDir:
        assert self._data_dir is not None
        return self._data_dir

    @property
    def proxy_control(self) -> ProxyControl | None:
        """The proxy's control socket and worker (None with ``proxy.enabled = false``)."""
        return self._proxy

    def stop(self) -> None:
        """Ask ``run`` to shut down (without leaving the cluster)."""
        systemd.stopping()
        if self._proxy is not None:
            self._proxy.stopping()
        self._stop.set()

    # ------------------------------------------------------------------ run

    async def run(self, *, ready: Callable[[Agent], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT (leave), ``PUT /v1/agent/leave`` or ``stop()``."""
        config = self.config
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            self._open_data_dir(stack)
            node_id = self.data_dir.node_id()
            self._keyring = self._load_keyring()
            envelope = Envelope(config.cluster, self._keyring)
            queue_holder: list[Catalog] = []
            gossip_config = config.gossip
            queue = BroadcastQueue(
                gossip_config.retransmit_mult,
                lambda: max(1, len(queue_holder[0].nodes())) if queue_holder else 1,
                retransmit_min=gossip_config.retransmit_min,
            )
            placeholder = NodeInfo(config.node_name, node_id, "0.0.0.0", config.datacenter)
            catalog = Catalog(placeholder, queue=queue, now=loop.time())
            queue_holder.append(catalog)
            self._catalog = catalog
            self._restore_local_state()
            self._register_config_services(config)
            self._bundles = BundleStore(self.data_dir, queue)
            self._policy = PolicyStore(self._bundles.verify, queue=queue)
            self._policy_delegate = PolicyDelegate(self._policy)
            self._restore_policy()
            self._policy.on_change(self._policy_changed)
            if config.proxy.enabled:
                self.proxy_port = config.proxy.port or _free_port(self._proxy_host())

            transport = GossipTransport(
                config.node_name,
                gossip_config,
                bind_host=config.bind_addr,
                port=config.gossip_port,
                advertise_host=config.advertise_addr,
                envelope=envelope,
                delegate=_AgentDelegate(catalog, self),
                on_event=self._on_event,
                meta=self.node_meta(),
                rng=random.Random(self._rng.random()),
            )
            await transport.start()
            stack.push_async_callback(transport.aclose)
            self._transport = transport
            self.gossip_port = transport.address[1]
            catalog.set_local_node(
                NodeInfo(config.node_name, node_id, transport.address[0], config.datacenter)
            )
            register_gossip_metrics(self.registry, lambda: transport.core)
            register_catalog_metrics(self.registry, catalog)
            self._rpc = Rpc(
                config.node_name,
                lambda address, payload: transport.send_user(address, payload, reliable=True),
                self._member_address,
                random.Random(self._rng.random()),
            )
            stack.push_async_callback(self._rpc.aclose)
            if config.server:
                self._start_election(stack)
                self._start_ca_server(stack)
            self._leaves = LeafManager(
                node=config.node_name,
                datacenter=config.datacenter,
                data_dir=self.data_dir,
                bundles=self._bundles,
                request=self._request_leaf,
                wanted=self._wanted_leaves,
                spread=self._reissue_spread,
                rng=random.Random(self._rng.random()),
            )
            stack.callback(self._leaves.close)
            self._leaves.on_change(self._connect_changed)
            self._bundles.on_change(self._bundle_changed)
            register_connect_metrics(self.registry, self.connect_stats)
            if config.proxy.enabled:
                await self._start_proxy(stack)

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True)
            )
            stack.push_async_callback(self._session.close)
            runner = CheckRunner(
                self._on_check_update,
                enable_script_checks=config.enable_script_checks,
                session=self._session,
                rng=random.Random(self._rng.random()),
            )
            await runner.start()
            stack.push_async_callback(runner.aclose)
            self._runner = runner
            self._sync_checks()
            self.local_changed()

            app = api.build_app(
                self,
                catalog,
                connect=self,
                acl=config.acl,
                registry=self.registry,
                datacenter=config.datacenter,
                node_name=config.node_name,
            )
            http_runner, self.http_port = await api.serve(
                app, config.http_addr.host, config.http_addr.port
            )
            stack.push_async_callback(http_runner.cleanup)

            for sig, handler in (
                (signal.SIGTERM, self._leave_and_stop),
                (signal.SIGINT, self._leave_and_stop),
                (signal.SIGHUP, self._reload),
            ):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, handler)
                    stack.callback(loop.remove_signal_handler, sig)

            log.info(
                "agent_started",
                node=config.node_name,
                gossip=f"{transport.address[0]}:{transport.address[1]}",
                http=f"{config.http_addr.host}:{self.http_port}",
                data_dir=str(self.data_dir.path),
                dev=config.dev,
            )
            # Ready before joining: a restarted agent already serves its saved state.
            systemd.ready()
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._join_cluster(stack)),
                    group.create_task(self._housekeeping()),
                    group.create_task(self._leaves.run()),
                ]
                if self._ca_server is not None:
                    tasks.append(group.create_task(self._ca_server.run()))
                watchdog_interval = systemd.watchdog_interval()
                if watchdog_interval is not None:
                    tasks.append(group.create_task(systemd.keep_watchdog_alive(watchdog_interval)))
                if ready is not None:
                    ready(self)
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
            self._save_members()
            self._save_policy()
            log.info("agent_stopped", node=config.node_name, left=self._stopped_by_leave)

    def _open_data_dir(self, stack: contextlib.AsyncExitStack) -> None:
        path = self.config.data_dir
        if path is None:
            if not self.config.dev:
                raise ConfigError("data_dir", "configuration", "data_dir is required")
            self._temp_dir = Path(tempfile.mkdtemp(prefix="meshnode-dev-"))
            stack.callback(shutil.rmtree, self._temp_dir, True)
            path = self._temp_dir
        data_dir = DataDir(path)
        data_dir.ensure()
        data_dir.lock()
        stack.callback(data_dir.unlock)
        self._data_dir = data_dir

    # ------------------------------------------------------------------ local state

    def _restore_local_state(self) -> None:
        saved = self.data_dir.load_local_state()
        if not isinstance(saved, Mapping) or "record" not in saved:
            return
        try:
            record = NodeRecord.from_dict(saved["record"])
        except ValidationError as exc:
            log.warning("local_state_unreadable", error=str(exc))
            return
        if record.node != self.config.node_name:
            log.warning("local_state_other_node", saved=record.node, node=self.config.node_name)
            return
        self.catalog.restore_local(record)
        log.info("local_state_restored", services=len(record.services), checks=len(record.checks))

    def _register_config_services(self, config: AgentConfig) -> None:
        """Register the services of the configuration files (refusing bad ones at
        startup with the file named; on reload, logging them)."""
        wanted: set[str] = set()
        for source in config.services:
            try:
                service, checks = parse_registration(dict(source.definition))
                for check in checks:
                    self.check_allowed(check)
            except ValidationError as exc:
                raise ConfigError(source.key, str(source.source), str(exc)) from None
            self.catalog.register_service(service, checks)
            wanted.add(service.id)
        for stale in self._config_services - wanted:
            with contextlib.suppress(LookupError):
                self.catalog.deregister_service(stale)
        self._config_services = wanted

    def local_changed(self) -> None:
        """Persist our record and bring the check runner in line with it."""
        self.data_dir.save_local_state({"record": self.catalog.local.to_dict()})
        self._sync_checks()
        if self._leaves is not None:
            self._leaves.wake()

    # ------------------------------------------------------------------ policy on disk

    def _restore_policy(self) -> None:
        """Enforce the policy we last knew before rejoining anyone (each entry is
        verified against the saved bundle, like any other)."""
        policy = self.policy
        data = self.data_dir.read_bytes(POLICY_FILE)
        if data is None:
            return
        try:
            entries, bad = decode_state(data)
        except PolicyDecodeError as exc:
            log.error("policy_unreadable", file=POLICY_FILE, error=str(exc))
            return
        now = asyncio.get_running_loop().time()
        applied = sum(1 for entry in entries if policy.apply(entry, now, broadcast=False))
        log.info("policy_restored", entries=applied, refused=len(entries) - applied + bad)

    def _policy_changed(self, index: int) -> None:
        if self._policy_save is None:
            loop = asyncio.get_running_loop()
            self._policy_save = loop.call_later(POLICY_SAVE_DELAY, self._save_policy)

    def _save_policy(self) -> None:
        if self._policy_save is not None:
            self._policy_save.cancel()
            self._policy_save = None
        if self._policy is None or self._data_dir is None:
            return
        delegate = self._policy_delegate
        assert delegate is not None
        try:
            self._data_dir.atomic_write_bytes(POLICY_FILE, delegate.local_state(False))
        except DataDirError as exc:
            log.error("policy_not_saved", error=str(exc))

    def _sync_checks(self) -> None:
        runner = self._runner
        if runner is None:
            return
        specs: list[CheckSpec] = []
        for state in self.catalog.local.checks.values():
            try:
                specs.append(CheckSpec.from_fields(state.definition))
            except CheckError as exc:
                log.warning("check_not_runnable", check=state.definition.check_id, error=str(exc))
        runner.replace_all(specs)

    def _on_check_update(self, check_id: str, status: str, output: str) -> None:
        with contextlib.suppress(LookupError):
            if self.catalog.update_check(check_id, HealthStatus(str(status)), output):
                self.data_dir.save_local_state({"record": self.catalog.local.to_dict()})

    # ------------------------------------------------------------------ gossip

    def _on_event(self, event: Event) -> None:
        name, fields = _describe(event)
        level = log.warning if isinstance(event, MemberFailed | MemberSuspected) else log.info
        level(name, **fields)
        if isinstance(
            event,
            MemberJoined
            | MemberUpdated
            | MemberSuspected
            | MemberRecovered
            | MemberFailed
            | MemberLeft
            | MemberReaped,
        ):
            member_event: MemberEvent = event
            if self._catalog is not None:
                self._catalog.on_member_event(member_event, asyncio.get_running_loop().time())
            if self._proxy is not None:
                self._proxy.changed()  # a member's proxy port may have changed
            if self._election is not None:
                self._election.on_member_event(member_event)
            self._client_leader = None
            self._members_dirty = True
            if isinstance(event, MemberJoined):
                self._joined.set()

    # ------------------------------------------------------------------ election

    def _start_election(self, stack: contextlib.AsyncExitStack) -> None:
        """Run the leader election on this server (after the transport started: the
        election needs our gossip address, where its messages arrive)."""
        transport = self.transport
        driver = ElectionDriver.create(
            self.config.node_name,
            transport.address,
            bootstrap_expect=self.config.bootstrap_expect,
            rng=random.Random(self._rng.random()),
            data_dir=self.data_dir,
            # Datagrams, not streams: the core resends requests and heartbeats itself.
            send=lambda address, payload: transport.send_user(address, payload),
            on_claim_changed=self._publish_node_meta,
        )
        stack.callback(driver.close)
        self._election = driver
        driver.sync_members(transport.core.members())
        register_election_metrics(self.registry, lambda: driver.election)

    def _start_ca_server(self, stack: contextlib.AsyncExitStack) -> None:
        """The CA service (after the election: it asks the election who leads)."""
        config = self.config
        election = self._election
        assert election is not None and self._rpc is not None
        assert self._policy is not None and self._bundles is not None
        bundles = self._bundles

        def servers() -> list[tuple[str, Address]]:
            return [(s.name, s.address) for s in election.election.servers()]

        def publish(bundle: TrustBundle) -> None:
            bundles.apply(bundle, authoritative=True)

        loop = asyncio.get_running_loop()
        server = CaServer(
            CaSettings(
                node=config.node_name,
                datacenter=config.datacenter,
                cluster=config.cluster,
                leaf_ttl=timedelta(seconds=config.ca.leaf_ttl),
                trust_domain=config.ca.trust_domain,
                cert_file=config.ca.cert_file,
                key_file=config.ca.key_file,
                acl_enabled=config.acl.enabled,
                acl_token=config.acl.token,
            ),
            rpc=self._rpc,
            data_dir=self.data_dir,
            policy=self._policy,
            is_leader=lambda: election.election.is_leader,
            term=lambda: election.election.term,
            leader_address=election.election.leader_address,
            servers=servers,
            is_server=self._is_server,
            registered=self._service_registered_on,
            learn_record=self._learn_record,
            known_bundle=lambda: bundles.bundle,
            publish_bundle=publish,
            monotonic=loop.time,
        )
        stack.callback(server.close)
        self._ca_server = server

    def _learn_record(self, node: str, data: bytes) -> None:
        """A CSR's sender's own catalog record: merge it if it is that node's (a node
        is the only writer of its record, and could gossip the same thing)."""
        try:
            update = decode_update(data)
        except CatalogDecodeError:
            return
        if update.base == 0 and update.record.node == node:
            self.catalog.merge(update.record)

    def _is_server(self, node: str) -> bool:
        member = self.transport.core.member(node)
        return member is not None and meta_is_server(member.meta)

    def _service_registered_on(self, node: str, service: str) -> bool:
        """The CA's question: is ``service`` registered on ``node`` (for the agent's
        own identity, ``""``: is ``node`` a member)?"""
        record = self.catalog.record(node)
        if record is None:
            return False
        if not service:
            return True
        return any(instance.name == service for instance in record.services.values())

    def _member_address(self, node: str) -> Address | None:
        member = self.transport.core.member(node)
        if member is None or member.state not in (MemberState.ALIVE, MemberState.SUSPECT):
            return None
        return member.address

    def receive_election_message(self, message: bytes) -> None:
        """A gossip user message tagged ``L``. Only servers are sent any; elsewhere
        (a stray one) there is no election to give it to, and it is dropped."""
        if self._election is not None:
            self._election.receive(message)

    def _publish_node_meta(self) -> None:
        """Gossip our new metadata (a new incarnation, one alive broadcast) if it
        changed; tell the CA service, since this is called when the leader changes."""
        if self._ca_server is not None:
            self._ca_server.leadership_changed()
        meta = self.node_meta()
        if self._transport is not None and meta != self._published_meta:
            self._published_meta = meta
            self._transport.core.set_meta(meta, asyncio.get_running_loop().time())

    async def _join_cluster(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        seeds = [f"{hp.host}:{hp.port}" for hp in config.retry_join]
        if not seeds:
            saved = self.data_dir.load_members()
            seeds = [
                f"[{m.host}]:{m.port}" if ":" in m.host else f"{m.host}:{m.port}"
                for m in saved
                if m.name != config.node_name
            ]
            if seeds:
                log.info("rejoining_saved_members", count=len(seeds))
        if config.mdns.enabled and not config.dev:
            await self._start_mdns(stack)
        if not seeds:
            return

        async def attempt(addresses: Sequence[str]) -> bool:
            try:
                await self.join(addresses)
            except ValueError as exc:
                log.info("join_failed", error=str(exc))
                return False
            return True

        joiner = RetryJoiner(
            seeds,
            attempt,
            rng=random.Random(self._rng.random()),
            initial_delay=config.retry_interval,
            max_delay=max(config.retry_interval, config.retry_max_interval),
            max_attempts=config.retry_max or None,
        )
        await joiner.run()

    async def _start_mdns(self, stack: contextlib.AsyncExitStack) -> None:
        transport = self.transport

        async def on_peer(address: tuple[str, int]) -> None:
            if address != transport.address:
                with contextlib.suppress(ValueError):
                    await self.join([f"{address[0]}:{address[1]}"])

        try:
            discovery = MdnsDiscovery(
                node=self.config.node_name,
                cluster=self.config.cluster,
                advertise_host=transport.address[0],
                gossip_port=transport.address[1],
                on_peer=on_peer,
                interface=self.config.mdns.interface,
            )
            await discovery.start()
        except Exception as exc:  # mDNS is a hint: never fatal
            log.warning("mdns_unavailable", error=str(exc))
            return
        stack.push_async_callback(discovery.aclose)

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            now = loop.time()
            catalog = self.catalog
            catalog.sync_members(self.transport.core.members(), now)
            catalog.reap(now, self.config.reconnect_timeout)
            if self._policy is not None:
                self._policy.gc(now)  # tombstones past their TTL
            runner = self._runner
            if runner is not None:
                for check_id in runner.deregister_due():
                    self._deregister_for_check(check_id)
            if self._members_dirty:
                self._save_members()

    def _deregister_for_check(self, check_id: str) -> None:
        state = self.catalog.local.checks.get(check_id)
        if state is None or not state.definition.service_id:
            return
        service_id = state.definition.service_id
        with contextlib.suppress(LookupError):
            self.catalog.deregister_service(service_id)
            log.info("service_deregistered_critical", service=service_id, check=check_id)
            self.local_changed()

    def _save_members(self) -> None:
        if self._transport is None or self._data_dir is None:
            return
        self._members_dirty = False
        members = [
            (m.name, m.address[0], m.address[1])
            for m in self._transport.core.members()
            if m.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ]
        self._data_dir.save_members(members)

    # ------------------------------------------------------------------ signals

    def _leave_and_stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stopping()  # the signal may have reached the worker too
        asyncio.get_running_loop().create_task(self.leave())

    def reload(self) -> None:
        """Reload configuration files (SIGHUP, ``PUT /v1/agent/reload``)."""
        self._reload()

    def _reload(self) -> None:
        if self._reload_config is None:
            return
        systemd.reloading()
        # READY=1 ends the reload whatever happened: systemd waits for it before the
        # next reload (and, with Type=notify-reload, before `systemctl reload` returns).
        try:
            try:
                config = self._reload_config()
            except ConfigError as exc:
                log.error("reload_failed", error=str(exc))
                return
            configure_logging(config.log_level, config.log_format)
            try:
                self._register_config_services(config)
            except ConfigError as exc:
                log.error("reload_failed", error=str(exc))
                return
            self.config = config
            self.local_changed()
            if self._proxy is not None:
                self._proxy.changed()  # access log settings (port and worker: restart)
            log.info("reloaded", services=len(config.services))
        finally:
            systemd.ready()

    # ------------------------------------------------------------------ AgentHandle

    def members(self) -> list[Member]:
        return self.transport.core.members()

    def leader(self) -> str:
        """The leader's gossip address (``ip:port``), ``""`` if none is known. A server
        asks its own election; a client trusts the newest claim servers gossip."""
        if self._election is not None:
            address = self._election.election.leader_address()
            return format_address(address) if address is not None else ""
        if self._client_leader is None:
            member = leader_from_members(self.transport.core.members())
            self._client_leader = format_address(member.address) if member else ""
        return self._client_leader

    def peers(self) -> list[str]:
        """The servers' gossip addresses: the election's server set on a server, the
        members whose metadata says server on a client."""
        if self._election is not None:
            return [format_address(s.address) for s in self._election.election.servers()]
        return [format_address(m.address) for m in servers_from_members(self.members())]

    def self_info(self) -> dict[str, object]:
        """What the API does not know itself: server role and gossip statistics."""
        config = self.config
        core = self.transport.core
        server = "true" if config.server else "false"
        stats: dict[str, object] = {}
        if self._proxy is not None:
            proxy = self._proxy.stats()
            stats["proxy"] = {  # strings, as every Stats value in Consul
                "port": str(self.proxy_port),
                "snapshot_version": str(proxy.snapshot_version),
                "applied_version": str(proxy.applied_version),
                "snapshots_rejected": str(proxy.snapshots_rejected),
                "last_rejection": proxy.last_rejection,
                "workers_connected": str(proxy.workers_connected),
                "worker_restarts": str(proxy.worker_restarts),
                "managed": "true" if config.proxy.managed else "false",
            }
        return {
            "Config": {"Server": config.server},
            "Stats": {
                **stats,
                "consul": {"server": server},
                "serf_lan": {
                    "members": str(core.count(MemberState.ALIVE)),
                    "incarnation": str(core.incarnation),
                    "health_score": str(core.awareness),
                    "encrypted": "true" if self._keyring is not None else "false",
                },
            },
        }

    async def join(self, addresses: Sequence[str] | str) -> None:
        """Join via these addresses; ValueError if none could be contacted."""
        if isinstance(addresses, str):
            addresses = [addresses]
        seeds = [parse_host_port(a) for a in addresses]
        result = await self.transport.join(seeds)
        if result.contacted == 0:
            raise ValueError(f"could not contact any of {', '.join(addresses)}")

    async def leave(self) -> None:
        """Leave the cluster gracefully, then stop."""
        if self._stopped_by_leave:
            return
        self._stopped_by_leave = True
        log.info("agent_leaving", node=self.config.node_name)
        if self._proxy is not None:
            self._proxy.stopping()
        systemd.stopping()
        if self._election is not None:
            self._election.leave()  # step down now; the others drop us on MemberLeft
        with contextlib.suppress(Exception):
            await self.transport.leave()
        self._stop.set()

    def ttl_update(self, check_id: str, status: HealthStatus, output: str) -> None:
        runner = self._runner
        if runner is None:
            raise KeyError(check_id)
        try:
            runner.ttl_update(check_id, str(status), output)
        except CheckError as exc:
            raise KeyError(str(exc)) from None

    def check_allowed(self, check: CheckDefinition) -> None:
        if check.kind == "script" and not self.config.enable_script_checks:
            raise ValidationError(
                f"Check {check.check_id}",
                "script checks are disabled (set enable_script_checks = true)",
            )

    def mesh_gossip_info(self) -> dict[str, object]:
        core = self.transport.core
        stats = core.stats
        keyring = self._keyring
        return {
            "Name": core.name,
            "Address": f"{core.address[0]}:{core.address[1]}",
            "Incarnation": core.incarnation,
            "Awareness": core.awareness,
            "Digest": core.digest().hex(),
            "Members": {state.name.lower(): core.count(state) for state in MemberState},
            "Encrypted": keyring is not None,
            "KeyFingerprints": [_fingerprint(k) for k in keyring.keys()] if keyring else [],  # noqa: SIM118
            "Stats": {
                "packets_sent": stats.packets_sent,
                "packets_received": stats.packets_received,
                "bytes_sent": stats.bytes_sent,
                "bytes_received": stats.bytes_received,
                "stream_bytes_sent": stats.stream_bytes_sent,
                "stream_bytes_received": stats.stream_bytes_received,
                "probes": stats.probes,
                "probes_failed": stats.probes_failed,
                "suspicions_started": stats.suspicions_started,
                "refutations": stats.refutations,
                "dropped": dict(stats.dropped),
            },
        }

    async def keyring(self, op: str, key: str | None) -> dict[str, object]:
        """The cluster's keyring: ``list`` counts members per key (from their
        metadata); ``install``, ``use`` and ``remove`` change ours and gossip the
        change to every member. Rotate in three steps, each one seen by every member
        (``list``) before the next: install, use, remove."""
        keyring = self._keyring
        if keyring is None:
            raise ValueError("gossip encryption is not enabled on this agent")
        if op != "list":
            if key is None:
                raise ValueError("a Key is required")
            raw = decode_key(key)
            if op == "use" and raw not in keyring.keys():  # noqa: SIM118
                raise ValueError("install the key (everywhere) before using it")
            if op == "remove" and raw == keyring.primary:
                raise ValueError("cannot remove the primary key; use another key first")
            self.apply_keyring_change(op, raw)
            message = KEYRING_TAG + msgpack.packb([op, raw], use_bin_type=True)
            self.catalog.queue.queue(message, f"keyring:{_fingerprint(raw)}")
        return self.keyring_status()

    def keyring_status(self) -> dict[str, object]:
        """Consul's shape: keys (base64) → how many live members hold them."""
        keyring = self._keyring
        assert keyring is not None
        alive = [
            m
            for m in self.transport.core.members()
            if m.state in (MemberState.ALIVE, MemberState.SUSPECT)
        ]
        counts: dict[bytes, int] = {}
        for member in alive:
            for fingerprint in _meta_fingerprints(member.meta):
                counts[fingerprint] = counts.get(fingerprint, 0) + 1
        keys = {
            base64.b64encode(k).decode(): counts.get(_short_fingerprint(k), 0)
            for k in keyring.keys()  # noqa: SIM118
        }
        primary = base64.b64encode(keyring.primary).decode()
        primaries = sum(
            1 for m in alive if _meta_primary(m.meta) == _short_fingerprint(keyring.primary)
        )
        return {
            "Keys": keys,
            "PrimaryKeys": {primary: primaries},
            "NumNodes": len(alive),
            "Datacenter": self.config.datacenter,
        }

    def apply_keyring_change(self, op: str, key: bytes) -> bool:
        """Apply a keyring change here; True if it changed anything."""
        keyring = self._keyring
        if keyring is None:
            return False
        before = keyring.keys()
        try:
            if op == "install":
                keyring.install(key)
            elif op == "use" and key in before:
                keyring.use(key)
            elif op == "remove" and key != keyring.primary:
                keyring.remove(key)
        except Exception as exc:
            log.warning("keyring_change_refused", op=op, key=_fingerprint(key), error=str(exc))
            return False
        if keyring.keys() == before:
            return False
        self._save_keyring()
        if self._transport is not None:
            core = self._transport.core
            core.set_meta(self.node_meta(), asyncio.get_running_loop().time())
        log.info("keyring_changed", op=op, key=_fingerprint(key))
        return True

    def node_meta(self) -> bytes:
        """Node metadata (``meshnode.leadership``): 4-byte fingerprints of our keys,
        primary first; on servers the server tag and the leader we follow."""
        keyring = self._keyring
        fingerprints = [_short_fingerprint(k) for k in keyring.keys()[:32]] if keyring else []
        election = self._election
        bundles, leaves = self._bundles, self._leaves
        soonest = leaves.soonest_expiry() if leaves is not None else None
        meta = encode_node_meta(
            fingerprints,
            server=self.config.server,
            leader=election.leader_claim() if election is not None else None,
            bundle=(
                bytes.fromhex(bundles.fingerprint)[:META_BUNDLE_BYTES]
                if bundles is not None and bundles.fingerprint
                else b""
            ),
            soonest_expiry=int(soonest.timestamp()) if soonest is not None else None,
        )
        return with_proxy_port(meta, self.proxy_port)

    # ------------------------------------------------------------------ proxy

    def _proxy_host(self) -> str:
        return self.config.proxy.bind_address or self.config.bind_addr

    async def _start_proxy(self, stack: contextlib.AsyncExitStack) -> None:
        """The control socket, a worker if managed, and the changes that rebuild the
        snapshot: catalog (registrations, health, liveness), policy, leaves and trust
        bundle (``on_connect_change``), and member events (proxy ports, in
        ``_on_event``)."""
        config = self.config.proxy
        path = self.data_dir.path / SOCKET_NAME
        command = worker_command(path, event_loop=config.event_loop) if config.managed else None
        control = ProxyControl(path, self.proxy_snapshot, worker_command=command)
        try:
            await control.start()
        except (OSError, ValueError) as exc:
            log.error("proxy_not_started", socket=str(path), error=str(exc))
            self.proxy_port = 0
            self._publish_node_meta()  # others must not route to a proxy we lack
            return
        stack.push_async_callback(control.aclose)
        self._proxy = control
        self.catalog.on_change(lambda _index: control.changed())
        self.policy.on_change(lambda _index: control.changed())
        self.on_connect_change(lambda _index: control.changed())

        def metrics() -> ProxyMetricsSource:
            stats = control.stats()
            return ProxyMetricsSource(
                worker_restarts=stats.worker_restarts,
                applied_version=stats.applied_version,
                snapshots_rejected=stats.snapshots_rejected,
                dump=stats.dump,
            )

        register_proxy_metrics(self.registry, metrics)

    def proxy_snapshot(self) -> Snapshot:
        """This host's proxy snapshot now (unnumbered: ``ProxyControl`` numbers them)."""
        config = self.config
        bundle = self.trust_bundle()
        now = datetime.now(UTC)
        leaves = self._leaves.leaves() if self._leaves is not None else []
        members = self._transport.core.members() if self._transport is not None else []
        ports = {member.name: proxy_port_of(member.meta) for member in members}
        ports[config.node_name] = self.proxy_port
        return build_snapshot(
            SnapshotInputs(
                node=config.node_name,
                datacenter=config.datacenter,
                host=self._proxy_host(),
                port=self.proxy_port,
                catalog=self.catalog,
                policy=self.policy.values(),
                leaves={
                    leaf.service: leaf for leaf in leaves if leaf.service and leaf.not_after > now
                },
                trust_domain=bundle.trust_domain if bundle is not None else "",
                roots=bundle.root_pems if bundle is not None else (),
                proxy_ports=ports,
                default_allow=config.default_intention_policy == "allow",
                access_log=AccessLog(config.proxy.access_log, config.proxy.access_log_sample),
            )
        )

    def _load_keyring(self) -> Keyring | None:
        saved = self.data_dir.read_json(KEYRING_FILE)
        keys: list[bytes] = []
        if isinstance(saved, list):
            for text in saved:
                with contextlib.suppress(ValueError, TypeError):
                    keys.append(decode_key(str(text)))
        # Keys changed at run time (saved) win; the configured key is added if missing.
        if self.config.encrypt is not None and self.config.encrypt not in keys:
            keys.append(self.config.encrypt)
        return Keyring(keys) if keys else None

    def _save_keyring(self) -> None:
        if self._keyring is not None:
            self.data_dir.atomic_write_json(
                KEYRING_FILE,
                [base64.b64encode(k).decode() for k in self._keyring.keys()],  # noqa: SIM118
            )

    # ------------------------------------------------------------------ connect: parts

    @property
    def policy(self) -> PolicyStore:
        assert self._policy is not None
        return self._policy

    @property
    def default_intention_policy(self) -> str:
        return self.config.default_intention_policy

    def trust_bundle(self) -> TrustBundle | None:
        return self._bundles.bundle if self._bundles is not None else None

    def connect_index(self) -> int:
        bundles, leaves = self._bundles, self._leaves
        return (bundles.index if bundles else 0) + (leaves.index if leaves else 0)

    def on_connect_change(self, callback: Callable[[int], None]) -> Callable[[], None]:
        self._connect_listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._connect_listeners:
                self._connect_listeners.remove(callback)

        return unsubscribe

    def _connect_changed(self, index: int = 0) -> None:
        index = self.connect_index()
        for listener in list(self._connect_listeners):
            listener(index)
        self._publish_node_meta()

    def _bundle_changed(self, bundle: TrustBundle) -> None:
        if self._ca_server is not None:
            self._ca_server.bundle_seen(bundle)
        self._connect_changed()

    def _wanted_leaves(self) -> set[str]:
        """The identities this agent needs: its own and each local service's."""
        wanted = {""}
        wanted.update(instance.name for instance in self.catalog.local.services.values())
        return wanted

    def _reissue_spread(self) -> timedelta:
        """How long to spread re-issues after a rotation: the cluster's instance count
        over half the leader's signing capacity (``ca.renewal.rotation_spread``)."""
        instances = sum(len(r.services) + 1 for r in self.catalog.records())
        return rotation_spread(instances, ASSUMED_SIGNING_RATE)

    def connect_stats(self) -> ConnectStats:
        policy, bundles, leaves = self._policy, self._bundles, self._leaves
        assert policy is not None and bundles is not None and leaves is not None
        delegate = self._policy_delegate
        soonest = leaves.soonest_expiry()
        status = self.ca_status()
        server = self._ca_server
        rpc = self._rpc
        return ConnectStats(
            policy_entries=len(policy.values()),
            policy_outcomes=dict(policy.stats),
            policy_rejected=dict(delegate.decode_errors) if delegate else {},
            bundle_version=bundles.bundle.version if bundles.bundle else 0,
            bundle_outcomes=dict(bundles.stats),
            leaves=len(leaves.leaves()),
            leaf_outcomes=dict(leaves.stats),
            seconds_to_expiry=(
                (soonest - datetime.now(UTC)).total_seconds() if soonest is not None else None
            ),
            agents_lagging=int(str(status["Lagging"])),
            agents_expiring_soon=int(str(status["ExpiringSoon"])),
            ca_operations=dict(server.stats) if server is not None else {},
            rpc_dropped=dict(rpc.dropped) if rpc is not None else {},
        )

    # ------------------------------------------------------------------ connect: leader

    async def _call_leader(self, method: str, body: dict[str, Any]) -> Any:
        """Call ``method`` on the CA leader, waiting up to :data:`LEADER_WAIT` for one
        (elections take a second or two). Raises :class:`NoLeaderError`, or
        ``RpcError`` for the leader's own refusals."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEADER_WAIT
        delay = 0.1
        reason = "No cluster leader"
        while True:
            leader = self._leader_address()
            remaining = deadline - loop.time()
            if leader is not None and remaining > 0:
                try:
                    return await self._call_while_leading(leader, method, body, remaining)
                except RpcError as exc:
                    if exc.code not in RETRY_CODES:
                        raise
                    reason = f"No cluster leader ({exc.message})"
                    if exc.code == "leader_changed":
                        continue  # ask the new one at once
            if loop.time() + delay >= deadline:
                raise NoLeaderError(reason)
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    async def _call_while_leading(
        self, leader: Address, method: str, body: dict[str, Any], within: float
    ) -> Any:
        """``rpc.call`` to ``leader``, given up as soon as another leader is known: a
        request sent to a leader that just died gets no answer, and waiting out the
        timeout would add seconds to every failover."""
        rpc = self._rpc
        assert rpc is not None
        call = asyncio.ensure_future(rpc.call(leader, method, body, within=min(5.0, within)))
        try:
            while True:
                done, _ = await asyncio.wait({call}, timeout=LEADER_CHECK_INTERVAL)
                if done:
                    return call.result()
                if self._leader_address() not in (leader, None):
                    raise RpcError("leader_changed", "the leader changed")
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, RpcError):
                    await call

    def _leader_address(self) -> Address | None:
        if self._election is not None:
            return self._election.election.leader_address()
        member = leader_from_members(self.transport.core.members())
        return member.address if member is not None else None

    async def _request_leaf(self, service: str, csr: str) -> dict[str, Any]:
        request: dict[str, Any] = {"service": service, "csr": csr}
        local = self.catalog.local
        if local.version != self._record_sent_version:
            # Our own catalog record rides along (once per version): the leader checks
            # registrations in its catalog, which gossip may not have updated yet.
            record = encode_record(local)
            if len(record) <= MAX_RECORD_IN_CSR:
                request["record"] = record
        try:
            answer = await self._call_leader("ca.sign", request)
        except RpcError as exc:
            if exc.code == "not_registered":
                self._record_sent_version = None  # send it again with the retry
            raise RequestRefusedError(exc.code, exc.message) from None
        if "record" in request:
            self._record_sent_version = local.version
        if not isinstance(answer, dict):
            raise RequestRefusedError("bad_answer", "the leader's answer is not a map")
        return answer

    def _translate(self, exc: RpcError) -> Exception:
        if exc.code == "permission_denied":
            return PermissionDeniedError(exc.message)
        if exc.code == "invalid":
            return ValidationError("", exc.message)
        return RequestRefusedError(exc.code, exc.message)

    async def leaf_certificate(self, service: str) -> LocalLeaf:
        assert self._leaves is not None
        return await self._leaves.get(service)

    async def write_policy(self, value: PolicyValue, token: str | None) -> PolicyEntry:
        from meshnode.policy import value_to_body

        body = {"kind": value.kind, "name": value.name, "body": value_to_body(value)}
        return await self._policy_call("policy.write", body, token)

    async def delete_policy(self, kind: str, name: str, token: str | None) -> bool:
        if self.policy.get(kind, name) is None:
            return False
        entry = await self._policy_call("policy.delete", {"kind": kind, "name": name}, token)
        return entry is not None

    async def _policy_call(
        self, method: str, body: dict[str, Any], token: str | None
    ) -> PolicyEntry:
        if token is not None:
            body["token"] = token
        try:
            answer = await self._call_leader(method, body)
        except RpcError as exc:
            raise self._translate(exc) from None
        raw = answer.get("entry") if isinstance(answer, dict) else None
        if raw is None:
            return None  # type: ignore[return-value]
        if not isinstance(raw, bytes):
            raise RequestRefusedError("bad_answer", "the leader's answer has no entry")
        try:
            entry = decode_entry(raw)
        except PolicyDecodeError as exc:
            raise RequestRefusedError("bad_answer", str(exc)) from None
        # Read your writes: apply it here now rather than when gossip brings it.
        self.policy.apply(entry, asyncio.get_running_loop().time())
        return entry

    async def rotate_ca(self, token: str | None) -> str:
        body: dict[str, Any] = {} if token is None else {"token": token}
        try:
            answer = await self._call_leader("ca.rotate", body)
        except RpcError as exc:
            raise self._translate(exc) from None
        return str(answer.get("root", "")) if isinstance(answer, dict) else ""

    def ca_status(self) -> dict[str, object]:
        """Each live member's bundle fingerprint and soonest leaf expiry (from its
        metadata), compared with ours."""
        ours = self._bundles.fingerprint if self._bundles is not None else ""
        ours_short = bytes.fromhex(ours)[:META_BUNDLE_BYTES] if ours else b""
        now = datetime.now(UTC).timestamp()
        soon = self.config.ca.leaf_ttl * EXPIRING_SOON_SHARE
        agents: list[dict[str, object]] = []
        lagging = expiring = 0
        for member in sorted(self.transport.core.members(), key=lambda m: m.name):
            if member.state not in (MemberState.ALIVE, MemberState.SUSPECT):
                continue
            meta = decode_node_meta(member.meta)
            fingerprint = meta.get("b")
            expiry = meta.get("x")
            theirs = fingerprint.hex() if isinstance(fingerprint, bytes) else ""
            is_lagging = bool(ours_short) and theirs != ours_short.hex()
            expires = expiry if isinstance(expiry, int) and not isinstance(expiry, bool) else None
            is_expiring = expires is not None and expires - now < soon
            lagging += is_lagging
            expiring += is_expiring
            agents.append(
                {
                    "Node": member.name,
                    "BundleFingerprint": theirs,
                    "SoonestExpiry": (
                        datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z")
                        if expires is not None
                        else None
                    ),
                    "Lagging": is_lagging,
                    "ExpiringSoon": is_expiring,
                }
            )
        return {
            "BundleFingerprint": ours_short.hex(),
            "Agents": agents,
            "Lagging": lagging,
            "ExpiringSoon": expiring,
        }


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (``proxy.port = 0``): the worker binds it later,
    and our metadata must say which one."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _fingerprint(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def _short_fingerprint(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


def _meta_fingerprints(meta: bytes) -> list[bytes]:
    """The key fingerprints a member publishes in its metadata (none if unreadable)."""
    keys = decode_node_meta(meta).get("k")
    if not isinstance(keys, list):
        return []
    return [k for k in keys if isinstance(k, bytes)]


def _meta_primary(meta: bytes) -> bytes | None:
    fingerprints = _meta_fingerprints(meta)
    return fingerprints[0] if fingerprints else None


class _AgentDelegate(CatalogDelegate):
    """The catalog's delegate, plus cluster-wide keyring changes and election messages
    (user messages tagged ``L``, handed to the agent's election on servers).

    A keyring change travels as a user broadcast ``K`` + msgpack ``[op, key]`` in the
    catalog's broadcast queue; gossip is encrypted with the current key, so only
    members holding it can send one. Each member applies it (idempotently), re-gossips
    it if it was news, and publishes the fingerprints of its keys in its node
    metadata, which is how ``keyring list`` counts members per key.
    """

    def __init__(self, catalog: Catalog, agent: Agent) -> None:
        super().__init__(catalog)
        self._agent = agent

    def node_meta(self, limit: int) -> bytes:
        return self._agent.node_meta()

    def notify_message(self, message: bytes) -> None:
        tag = message[:1]
        agent = self._agent
        if tag == ELECTION_TAG:
            agent.receive_election_message(message)
            return
        if tag in (REQUEST_TAG, RESPONSE_TAG):
            if agent._rpc is not None:
                agent._rpc.receive(message)
            return
        if tag == _POLICY_TAG:
            if agent._policy_delegate is not None:
                agent._policy_delegate.notify_message(message, _loop_time())
            return
        if tag == BUNDLE_TAG:
            if agent._bundles is not None:
                agent._bundles.receive(message[1:])
            return
        if tag != KEYRING_TAG:
            super().notify_message(message)
            return
        try:
            op, key = msgpack.unpackb(message[1:], raw=False, max_array_len=4)
            if op not in ("install", "use", "remove") or not isinstance(key, bytes):
                raise ValueError(op)
        except (ValueError, TypeError, msgpack.UnpackException):
            self._reject(CatalogDecodeError("keyring_malformed"))
            return
        if self._agent.apply_keyring_change(op, key):
            self.catalog.queue.queue(message, f"keyring:{_fingerprint(key)}")

    # Push-pull carries every layer's full state: msgpack [catalog, policy, bundle].

    def local_state(self, join: bool) -> bytes:
        agent = self._agent
        policy = agent._policy_delegate.local_state(join) if agent._policy_delegate else b""
        bundle = agent._bundles.encoded if agent._bundles is not None else b""
        packed: bytes = msgpack.packb(
            [super().local_state(join), policy, bundle], use_bin_type=True
        )
        return packed

    def merge_remote_state(self, state: bytes, join: bool) -> None:
        try:
            parts = msgpack.unpackb(state, raw=False, max_array_len=3, max_bin_len=len(state))
            if not isinstance(parts, list) or len(parts) != 3:
                raise ValueError("not three parts")
            catalog_state, policy_state, bundle = parts
            if not all(isinstance(p, bytes) for p in parts):
                raise ValueError("parts are not bytes")
        except (ValueError, TypeError, msgpack.UnpackException):
            self._reject(CatalogDecodeError("state_malformed"))
            return
        agent = self._agent
        # Trust first, then what it verifies.
        if bundle and agent._bundles is not None:
            agent._bundles.receive(bundle)
        super().merge_remote_state(catalog_state, join)
        if policy_state and agent._policy_delegate is not None:
            agent._policy_delegate.merge_remote_state(policy_state, join, _loop_time())

    def state_digest(self) -> bytes:
        agent = self._agent
        policy = agent._policy.digest() if agent._policy is not None else b""
        bundle = agent._bundles.digest() if agent._bundles is not None else b""
        return super().state_digest() + policy + bundle


_POLICY_TAG: Final = bytes((POLICY_WIRE_TYPE,))


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


async def run_agent(config: AgentConfig, reload: Callable[[], AgentConfig] | None) -> int:
    """Run an agent until it stops; the exit status."""
    agent = Agent(config, reload=reload)
    try:
        await agent.run()
    except ConfigError as exc:
        log.error("agent_config_error", error=str(exc))
        return 1
    return 0


__all__ = ["Agent", "run_agent"]
