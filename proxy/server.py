"""A proxy worker process: ``python -m proxy --config FILE``.

**A stand-in.** Issue 5's worker is started and supervised by the agent and "fed over
a local socket with a snapshot" (listeners, routes, clusters, certificates, trust
bundle, intentions, limits), applied atomically with ``update()`` on the listeners.
Until that snapshot exists, this reads the same kind of data once from a JSON file,
for the L4 data path only, so the listeners can be run, tested and benchmarked as
real processes. The snapshot channel replaces :func:`load_config`; the listeners do
not change. (Configuration is otherwise read only in ``meshnode/config.py``; ``proxy``
may not import it, and this file is the snapshot's placeholder, not settings.)

The file::

    {
      "trust_bundle": ["-----BEGIN CERTIFICATE-----...", ...],
      "inbound": {                       # optional: this host's mTLS port
        "host": "127.0.0.1", "port": 20000,
        "services": {"api": {"target": ["127.0.0.1", 8080],
                             "cert_chain": "PEM (leaf first)", "private_key": "PEM"}},
        "allow": "all"          # or [["spiffe://td/ns/default/dc/dc1/svc/web", "api"], ...]
      },
      "outbound": [                      # optional: loopback listeners
        {"host": "127.0.0.1", "port": 15001, "upstream": "api",
         "expected_identity": "spiffe://td/ns/default/dc/dc1/svc/api",
         "cert_chain": "PEM of the source service", "private_key": "PEM",
         "endpoints": [["127.0.0.1", 20000]]}
      ],
      "connect_timeout": 5.0, "idle_timeout": 3600.0
    }

An allow list entry may use ``"*"`` for either member. Anything not allowed is
denied (default deny, as Consul intentions with ``default_policy = deny``).

On SIGTERM or SIGINT the worker stops accepting, drops open connections and exits
0. It prints one line ``ready`` on stdout when every listener accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.balancer import RoundRobinBalancer
from proxy.l4 import (
    InboundListener,
    InboundSettings,
    LocalService,
    OutboundListener,
    OutboundSettings,
)
from proxy.l4.transport import DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, Address, Authorize
from proxy.tls import ClientContexts, server_context

log = logging.getLogger("proxy.worker")

ANY = "*"


class WorkerConfigError(ValueError):
    """The worker's JSON file is unusable; the message names the key."""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    inbound: tuple[InboundListener, ...]
    outbound: tuple[OutboundListener, ...]


def allow_list(rules: str | Sequence[Sequence[str]]) -> Authorize:
    """``"all"``, or (source SPIFFE ID, service) pairs, ``"*"`` matching anything."""
    if rules == "all":
        return lambda peer, service: (True, "allow all")
    if isinstance(rules, str):
        raise WorkerConfigError(f"inbound.allow: 'all' or a list of pairs, not {rules!r}")
    pairs = frozenset((str(source), str(service)) for source, service in rules)

    def authorize(peer: str | None, service: str) -> tuple[bool, str]:
        if peer is not None and (
            (peer, service) in pairs or (peer, ANY) in pairs or (ANY, service) in pairs
        ):
            return True, "allowed"
        return (ANY, ANY) in pairs, "no allow rule"

    return authorize


def _address(value: Any, key: str) -> Address:
    if not (isinstance(value, list) and len(value) == 2):
        raise WorkerConfigError(f"{key}: [host, port] expected, not {value!r}")
    return str(value[0]), int(value[1])


def load_config(raw: dict[str, Any]) -> WorkerConfig:
    """Listeners (not started) from the parsed JSON file."""
    try:
        bundle = [str(pem) for pem in raw["trust_bundle"]]
        connect_timeout = float(raw.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        idle = raw.get("idle_timeout", DEFAULT_IDLE_TIMEOUT)
        idle_timeout = None if idle is None else float(idle)
        inbound: list[InboundListener] = []
        if raw.get("inbound"):
            spec = raw["inbound"]
            services = {
                name: LocalService(
                    name,
                    _address(service["target"], f"inbound.services.{name}.target"),
                    server_context(bundle, service["cert_chain"], service["private_key"]),
                )
                for name, service in spec["services"].items()
            }
            settings = InboundSettings(
                services, allow_list(spec.get("allow", [])), connect_timeout, idle_timeout
            )
            inbound.append(InboundListener(spec["host"], int(spec["port"]), bundle, settings))
        outbound = []
        for index, spec in enumerate(raw.get("outbound", [])):
            endpoints = [
                _address(endpoint, f"outbound[{index}].endpoints") for endpoint in spec["endpoints"]
            ]
            weighted = [(endpoint, 1) for endpoint in endpoints]
            balancer = RoundRobinBalancer(weighted, random.Random())
            out_settings = OutboundSettings(
                upstream=spec["upstream"],
                expected_identity=spec["expected_identity"],
                contexts=ClientContexts(bundle, spec["cert_chain"], spec["private_key"]),
                pick=balancer.pick,
                connect_timeout=connect_timeout,
                idle_timeout=idle_timeout,
            )
            outbound.append(OutboundListener(spec["host"], int(spec["port"]), out_settings))
    except KeyError as exc:
        raise WorkerConfigError(f"missing key {exc}") from None
    except (TypeError, AttributeError) as exc:
        raise WorkerConfigError(f"malformed configuration: {exc}") from None
    return WorkerConfig(tuple(inbound), tuple(outbound))


async def serve(config: WorkerConfig, ready: Callable[[], None] = lambda: None) -> None:
    """Run the listeners until SIGTERM or SIGINT, then close them."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listeners: list[InboundListener | OutboundListener] = [*config.inbound, *config.outbound]
    try:
        for listener in listeners:
            await listener.start()
            log.info("listening %s:%d", *listener.address)
        ready()
        await stop.wait()
    finally:
        for listener in listeners:
            await listener.aclose()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _run(main: Coroutine[Any, Any, None], event_loop: str = "auto") -> None:
    """Under uvloop when it is installed (extra ``speed``) and not refused, else
    asyncio's loop. ``--event-loop asyncio`` exists because uvloop's TLS has open
    memory-growth issues (MagicStack/uvloop#565): compare both in ``bench/proxy.py``."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="the worker's JSON file")
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="uvloop when installed (auto), or force one",
    )
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    try:
        config = load_config(json.loads(options.config.read_text()))
    except (OSError, ValueError) as exc:  # WorkerConfigError, JSON, ssl errors
        print(f"python -m proxy: {options.config}: {exc}", file=sys.stderr)
        return 2

    def ready() -> None:
        print("ready", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        _run(serve(config, ready), options.event_loop)
    return 0
