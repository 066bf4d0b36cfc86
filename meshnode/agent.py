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
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgpack
import structlog
from prometheus_client import CollectorRegistry

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
from meshnode.catalog import Catalog, CatalogDecodeError, CatalogDelegate, NodeRecord
from meshnode.checks import CheckError, CheckRunner, CheckSpec
from meshnode.config import AgentConfig
from meshnode.discovery import MdnsDiscovery, RetryJoiner
from meshnode.errors import ConfigError
from meshnode.leadership import (
    ELECTION_TAG,
    ElectionDriver,
    decode_node_meta,
    encode_node_meta,
    format_address,
    leader_from_members,
    servers_from_members,
)
from meshnode.logging import configure_logging
from meshnode.metrics import (
    register_catalog_metrics,
    register_election_metrics,
    register_gossip_metrics,
)
from meshnode.model import (
    CheckDefinition,
    HealthStatus,
    NodeInfo,
    ValidationError,
    parse_registration,
)
from meshnode.persistence import DataDir

log = structlog.get_logger()

#: First byte of a keyring-change broadcast (catalog messages start with ``C``,
#: election messages with ``L``: ``meshnode.leadership.ELECTION_TAG``).
KEYRING_TAG: Final = b"K"
#: How often the agent reaps long-dead nodes, saves members and deregisters services
#: whose critical checks asked for it.
HOUSEKEEPING_INTERVAL: Final = 5.0
KEYRING_FILE: Final = "keyring.json"


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
        # A client's answer to "who leads" (from the servers' metadata), cached because
        # every HTTP response asks (X-Consul-KnownLeader); reset by member events.
        self._client_leader: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self.http_port: int | None = None
        self.gossip_port: int | None = None
        self._config_services: set[str] = set()
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

    def stop(self) -> None:
        """Ask ``run`` to shut down (without leaving the cluster)."""
        systemd.stopping()
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
            if config.server:
                self._start_election(stack)

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
                ]
                watchdog_interval = systemd.watchdog_interval()
                if watchdog_interval is not None:
                    tasks.append(group.create_task(systemd.keep_watchdog_alive(watchdog_interval)))
                if ready is not None:
                    ready(self)
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
            self._save_members()
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

    def receive_election_message(self, message: bytes) -> None:
        """A gossip user message tagged ``L``. Only servers are sent any; elsewhere
        (a stray one) there is no election to give it to, and it is dropped."""
        if self._election is not None:
            self._election.receive(message)

    def _publish_node_meta(self) -> None:
        """Gossip our new metadata (a new incarnation, one alive broadcast)."""
        if self._transport is not None:
            self._transport.core.set_meta(self.node_meta(), asyncio.get_running_loop().time())

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
        return {
            "Config": {"Server": config.server},
            "Stats": {
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
        return encode_node_meta(
            fingerprints,
            server=self.config.server,
            leader=election.leader_claim() if election is not None else None,
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
        if message[:1] == ELECTION_TAG:
            self._agent.receive_election_message(message)
            return
        if message[:1] != KEYRING_TAG:
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
