"""One gossip member as a process: transport, seeds, logs, a small status API.

This is the stage-one agent: it runs the gossip layer only (a later stage grows it into
the full agent with catalog, CA and proxy). It

* starts a ``GossipTransport`` and joins its seeds, retrying with capped exponential
  backoff until it is in a cluster (someone answered, or someone joined us);
* logs every member event as a structlog fact (``member_joined``, ``member_failed``...);
* serves ``/v1/agent/members`` (Consul's shape and serf status numbers),
  ``/v1/agent/join/<address>``, ``/v1/mesh/gossip`` and ``/v1/agent/metrics``;
* on SIGHUP re-reads the keyring file and makes the live keyring match it (install the
  new keys, use the first, remove the rest: Consul's three rotation steps, in order);
* on SIGTERM or SIGINT leaves gracefully (peers see *left*, not *failed*), exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, cast

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from gossip.config import DEFAULT_PORT, PRESETS, preset
from gossip.events import (
    Address,
    Event,
    JoinCompleted,
    LeaveCompleted,
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
from meshnode.logging import LEVELS, LogFormat, configure_logging
from meshnode.metrics import register_gossip_metrics

log = structlog.get_logger()

#: serf's MemberStatus numbers, which Consul's /v1/agent/members reports.
SERF_ALIVE: Final = 1
SERF_LEAVING: Final = 2
SERF_LEFT: Final = 3
SERF_FAILED: Final = 4
#: Join retry backoff: start quickly (the seed may be starting at the same moment),
#: cap low enough that a seed coming back is found within seconds.
JOIN_BACKOFF_FIRST: Final = 0.5
JOIN_BACKOFF_MAX: Final = 10.0
#: Largest keyring file we read; a few dozen keys are a few kilobytes.
KEYRING_FILE_MAX: Final = 64 * 1024

TRANSPORT = web.AppKey("transport", GossipTransport)
REGISTRY = web.AppKey("registry", CollectorRegistry)


@dataclass(frozen=True, slots=True)
class MemberOptions:
    """Settings of one member process (the ``meshnode member`` flags)."""

    name: str
    """Member name, unique in the cluster."""
    bind: str = "0.0.0.0"
    """Address the gossip sockets bind to."""
    advertise: str | None = None
    """Address peers should use to reach us (NAT, containers); default: the bind
    address, or a guess at our outbound address when binding a wildcard."""
    port: int = DEFAULT_PORT
    """Gossip port for UDP and TCP; 0 picks a free one."""
    http_addr: str = "127.0.0.1:8500"
    """host:port of the status API; port 0 picks a free one."""
    join: tuple[str, ...] = ()
    """Seed addresses (host, host:port, [v6]:port)."""
    cluster: str = ""
    """Cluster name: members of different clusters never merge."""
    preset: str = "default"
    """Gossip preset name (gossip.config.PRESETS)."""
    encrypt: str | None = None
    """A base64 gossip key, used when there is no keyring file."""
    keyring_file: Path | None = None
    """JSON list of base64 keys, primary first; re-read on SIGHUP."""
    log_format: LogFormat = "auto"
    log_level: str = "info"
    ready_file: Path | None = None
    """Written with {gossip_port, http_port, name} once both listeners are up."""


def add_member_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=socket.gethostname(), help="member name")
    parser.add_argument("--bind", default="0.0.0.0", help="gossip bind address")
    parser.add_argument("--advertise", default=None, help="address advertised to peers")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="gossip port (0: any)")
    parser.add_argument("--http-addr", default="127.0.0.1:8500", help="status API host:port")
    parser.add_argument(
        "--join", action="append", default=[], metavar="HOST:PORT", help="seed (repeatable)"
    )
    parser.add_argument("--cluster", default="", help="cluster name")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--encrypt", default=None, metavar="BASE64KEY", help="gossip key")
    parser.add_argument("--keyring-file", type=Path, default=None, metavar="PATH")
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    parser.add_argument("--log-level", default="info", choices=list(LEVELS))
    parser.add_argument("--ready-file", type=Path, default=None, metavar="PATH")


def options_from_args(args: argparse.Namespace) -> MemberOptions:
    return MemberOptions(
        name=args.name,
        bind=args.bind,
        advertise=args.advertise,
        port=args.port,
        http_addr=args.http_addr,
        join=tuple(args.join),
        cluster=args.cluster,
        preset=args.preset,
        encrypt=args.encrypt,
        keyring_file=args.keyring_file,
        log_format=cast(LogFormat, args.log_format),
        log_level=args.log_level,
        ready_file=args.ready_file,
    )


# ---------------------------------------------------------------------- keyring


def read_keyring_file(path: Path) -> list[bytes]:
    """Keys from a JSON list of base64 strings; ValueError says what is wrong."""
    with path.open("rb") as file:
        raw = file.read(KEYRING_FILE_MAX + 1)
    if len(raw) > KEYRING_FILE_MAX:
        raise ValueError(f"{path}: larger than {KEYRING_FILE_MAX} bytes")
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of base64 keys")
    keys: list[bytes] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ValueError(f"{path}: entry {index} is not a string")
        try:
            keys.append(decode_key(entry))
        except ValueError as exc:
            raise ValueError(f"{path}: entry {index}: {exc}") from None
    return keys


def initial_keys(options: MemberOptions) -> list[bytes]:
    """The keyring file wins when it exists (it is what SIGHUP re-reads); else --encrypt."""
    if options.keyring_file is not None and options.keyring_file.exists():
        return read_keyring_file(options.keyring_file)
    if options.encrypt:
        return [decode_key(options.encrypt)]
    return []


def key_fingerprint(key: bytes) -> str:
    """A short public name for a key (never log or serve the key itself)."""
    return hashlib.sha256(key).hexdigest()[:16]


def apply_keyring(envelope: Envelope, keys: Sequence[bytes]) -> None:
    """Make the live keyring hold exactly ``keys`` with ``keys[0]`` primary.

    Install first, then use, then remove, so no step leaves us unable to read what a
    peer (one step ahead or behind) sends.
    """
    if envelope.keyring is None:
        envelope.keyring = Keyring(keys)
        return
    keyring = envelope.keyring
    for key in keys:
        keyring.install(key)
    keyring.use(keys[0])
    installed = keyring.keys()
    for key in installed:
        if key not in keys:
            keyring.remove(key)


def reload_keyring(envelope: Envelope, path: Path | None) -> None:
    if path is None:
        log.warning("keyring_reload_skipped", reason="no --keyring-file")
        return
    try:
        keys = read_keyring_file(path)
    except (OSError, ValueError) as exc:
        log.error("keyring_reload_failed", path=str(path), error=str(exc))
        return
    apply_keyring(envelope, keys)
    assert envelope.keyring is not None
    log.info(
        "keyring_reloaded",
        primary=key_fingerprint(envelope.keyring.primary),
        keys=list(map(key_fingerprint, envelope.keyring.keys())),
    )


# ---------------------------------------------------------------------- events


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_event(event: Event) -> None:
    """One structlog fact per core event (STYLE.md rule 9: cores emit, adapters log)."""
    match event:
        case MemberJoined(member):
            log.info(
                "member_joined",
                member=member.name,
                address=format_address(member.address),
                incarnation=member.incarnation,
            )
        case MemberUpdated(member):
            log.info(
                "member_updated",
                member=member.name,
                address=format_address(member.address),
                incarnation=member.incarnation,
            )
        case MemberSuspected(member, accuser):
            log.info(
                "member_suspected",
                member=member.name,
                incarnation=member.incarnation,
                accuser=accuser,
            )
        case MemberRecovered(member):
            log.info("member_recovered", member=member.name, incarnation=member.incarnation)
        case MemberFailed(member):
            log.warning("member_failed", member=member.name, address=format_address(member.address))
        case MemberLeft(member):
            log.info("member_left", member=member.name, address=format_address(member.address))
        case MemberReaped(member):
            log.info("member_reaped", member=member.name)
        case SuspicionRefuted(incarnation, accuser):
            log.warning("suspicion_refuted", incarnation=incarnation, accuser=accuser)
        case JoinCompleted(contacted, failed):
            log.debug(
                "join_completed", contacted=contacted, failed=[format_address(a) for a in failed]
            )
        case LeaveCompleted():
            log.info("leave_completed")


async def join_until_joined(transport: GossipTransport, seeds: Sequence[str]) -> None:
    """Join ``seeds``, retrying with capped exponential backoff and jitter, until a
    seed answers or another member has found us."""
    delay = JOIN_BACKOFF_FIRST
    attempt = 0
    while True:
        attempt += 1
        result = await transport.join(seeds)
        if result.contacted > 0:
            log.info("cluster_joined", contacted=result.contacted, attempts=attempt)
            return
        if transport.core.count(MemberState.ALIVE) > 1:
            log.info("cluster_joined", contacted=0, attempts=attempt, via="inbound")
            return
        log.warning("join_failed", seeds=list(seeds), attempt=attempt, retry_in=round(delay, 2))
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(JOIN_BACKOFF_MAX, delay * 2)


# ---------------------------------------------------------------------- HTTP API


def member_status(transport: GossipTransport) -> list[dict[str, Any]]:
    """/v1/agent/members: Consul's list, serf status numbers; a suspect member is
    still alive to serf (status 1) and carries ``"State": "suspect"``."""
    core = transport.core
    result: list[dict[str, Any]] = []
    for member in core.members():
        entry: dict[str, Any] = {
            "Name": member.name,
            "Addr": member.address[0],
            "Port": member.address[1],
            "Tags": {},
            "Incarnation": member.incarnation,
        }
        if member.state == MemberState.ALIVE:
            entry["Status"] = SERF_ALIVE
        elif member.state == MemberState.SUSPECT:
            entry["Status"] = SERF_ALIVE
            entry["State"] = "suspect"
        elif member.state == MemberState.DEAD:
            entry["Status"] = SERF_FAILED
        else:
            entry["Status"] = SERF_LEAVING if member.name == core.name else SERF_LEFT
        result.append(entry)
    result.sort(key=lambda e: str(e["Name"]))
    return result


def gossip_status(transport: GossipTransport) -> dict[str, Any]:
    core = transport.core
    keyring = core.envelope.keyring
    return {
        "Name": core.name,
        "Addr": core.address[0],
        "Port": core.address[1],
        "Incarnation": core.incarnation,
        "Awareness": core.awareness,
        "Digest": core.digest().hex(),
        "Cluster": core.envelope.cluster,
        "Members": {state.name.lower(): core.count(state) for state in MemberState},
        "BroadcastQueue": core.broadcast_queue_depth,
        "Keyring": None
        if keyring is None
        else {
            "Primary": key_fingerprint(keyring.primary),
            "Keys": list(map(key_fingerprint, keyring.keys())),
        },
        "Stats": asdict(core.stats),
    }


async def handle_members(request: web.Request) -> web.Response:
    return web.json_response(member_status(request.app[TRANSPORT]))


async def handle_gossip(request: web.Request) -> web.Response:
    return web.json_response(gossip_status(request.app[TRANSPORT]))


async def handle_join(request: web.Request) -> web.Response:
    """PUT /v1/agent/join/<address> (Consul): push-pull with one more seed."""
    address = request.match_info["address"]
    try:
        parse_host_port(address)
    except ValueError as exc:
        return web.Response(status=400, text=str(exc))
    result = await request.app[TRANSPORT].join([address])
    if result.contacted == 0:
        return web.Response(status=500, text=f"failed to join {address}")
    return web.Response(status=200)


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    if request.query.get("format") == "prometheus":
        return await make_aiohttp_handler(registry)(request)
    # Consul answers without ?format in JSON; ours is a flat list of samples.
    samples = [
        {"Name": s.name, "Labels": s.labels, "Value": s.value}
        for family in registry.collect()
        for s in family.samples
    ]
    return web.json_response({"Samples": samples})


def make_app(transport: GossipTransport, registry: CollectorRegistry) -> web.Application:
    app = web.Application()
    app[TRANSPORT] = transport
    app[REGISTRY] = registry
    app.router.add_get("/v1/agent/members", handle_members)
    app.router.add_put("/v1/agent/join/{address}", handle_join)
    app.router.add_get("/v1/mesh/gossip", handle_gossip)
    app.router.add_get("/v1/agent/metrics", handle_metrics)
    return app


def _listen_socket(http_addr: str) -> socket.socket:
    host, port = parse_host_port(http_addr, default_port=8500)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _write_ready_file(path: Path, data: dict[str, Any]) -> None:
    # Write, then rename: a reader polling for the file never sees half of it.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


# ---------------------------------------------------------------------- main


async def run_member(options: MemberOptions) -> int:
    """Run until SIGTERM/SIGINT, then leave gracefully. Returns the exit code."""
    configure_logging(options.log_level, options.log_format)
    config = preset(options.preset)
    keys = initial_keys(options)
    envelope = Envelope(options.cluster, Keyring(keys) if keys else None)
    registry = CollectorRegistry()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    http_sock = _listen_socket(options.http_addr)
    transport = GossipTransport(
        options.name,
        config,
        bind_host=options.bind,
        port=options.port,
        advertise_host=options.advertise,
        envelope=envelope,
        on_event=log_event,
    )
    register_gossip_metrics(registry, lambda: None if transport.closed else transport.core)
    runner = web.AppRunner(make_app(transport, registry), access_log=None)
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        async with transport:
            await runner.setup()
            site = web.SockSite(runner, http_sock)
            await site.start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, reload_keyring, envelope, options.keyring_file)
            http_port = http_sock.getsockname()[1]
            log.info(
                "member_started",
                member=options.name,
                gossip=format_address(transport.address),
                bind=format_address(transport.bound_address),
                http_port=http_port,
                preset=options.preset,
                cluster=options.cluster,
                encrypted=envelope.keyring is not None,
            )
            if options.ready_file is not None:
                ready = {
                    "name": options.name,
                    "gossip_port": transport.address[1],
                    "http_port": http_port,
                    "pid": os.getpid(),
                }
                _write_ready_file(options.ready_file, ready)
            async with asyncio.TaskGroup() as group:
                joiner = None
                if options.join:
                    joiner = group.create_task(join_until_joined(transport, options.join))
                await stop.wait()
                if joiner is not None:
                    joiner.cancel()
            log.info("member_leaving", member=options.name)
            left = await transport.leave()
            log.info("member_stopped", member=options.name, left_cleanly=left)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        http_sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``meshnode member ...``: parse the flags and run until stopped."""
    parser = argparse.ArgumentParser(prog="meshnode member", description="run one gossip member")
    add_member_arguments(parser)
    return run(options_from_args(parser.parse_args(argv)))


def run(options: MemberOptions) -> int:
    """Run a member in a fresh event loop; bad settings give exit code 2."""
    try:
        return asyncio.run(run_member(options))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
        return 130
    except (ValueError, KeyError, OSError) as exc:
        # Bad key, unknown preset, port in use: say so in one line, no traceback.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"meshnode member: error: {message}", file=sys.stderr)
        return 2


def print_members(http_addr: str, output_format: str = "table") -> int:
    """``meshnode members``: what a running member sees, as a table or JSON."""
    host, port = parse_host_port(http_addr, default_port=8500)
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}/v1/agent/members"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            members = json.load(response)
    except (OSError, ValueError) as exc:
        print(f"meshnode members: error: {url}: {exc}", file=sys.stderr)
        return 1
    if output_format == "json":
        print(json.dumps(members, indent=2))
        return 0
    status_names = {SERF_ALIVE: "alive", SERF_LEAVING: "leaving", SERF_LEFT: "left"}
    status_names[SERF_FAILED] = "failed"
    rows = [("Node", "Address", "Status", "Incarnation")]
    for entry in members:
        status = entry.get("State") or status_names.get(entry.get("Status"), "unknown")
        address = format_address((str(entry["Addr"]), int(entry["Port"])))
        rows.append((str(entry["Name"]), address, status, str(entry.get("Incarnation", ""))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0
