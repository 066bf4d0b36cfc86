"""One gossip member with mDNS discovery, as a process: the unit of the netns test.

Run inside a network namespace::

    ip netns exec NS python -m tests.meshnode.mdns_node \\
        --name n1 --cluster alpha --host 10.213.7.1 --report /tmp/x/n1.json

It binds a real ``GossipTransport`` to ``--host``, runs ``MdnsDiscovery`` on that one
interface with ``on_peer`` joining each discovered peer, and rewrites ``--report``
(atomically: temp file and rename, so the test never reads half a file) every
``REPORT_INTERVAL`` with the names of the members it sees alive and the discovery
counters. It has no join address: mDNS is its only way into a cluster.

SIGTERM or SIGINT: close discovery (an mDNS goodbye) and the transport, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Final

from gossip.config import DEFAULT, GossipConfig
from gossip.events import Address, MemberState
from gossip.transport import GossipTransport, open_transport
from meshnode.discovery import MdnsDiscovery
from meshnode.logging import configure_logging

#: Fast failure detection and anti-entropy, so the cluster settles in a few seconds
#: (the same speed-up as tests/gossip/test_transport.py).
FAST: Final[GossipConfig] = DEFAULT.replace(
    probe_interval=0.2,
    probe_timeout=0.1,
    gossip_interval=0.05,
    push_pull_interval=1.0,
    tcp_timeout=2.0,
)
REPORT_INTERVAL: Final = 0.2
GOSSIP_PORT: Final = 7946


def write_report(path: Path, report: dict[str, object]) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(report))
    os.replace(temp, path)


async def run(name: str, cluster: str, host: str, report_path: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    joins: list[str] = []

    async with open_transport(name, FAST, bind_host=host, port=GOSSIP_PORT) as transport:

        async def join_peer(address: Address) -> None:
            result = await transport.join([address])
            joins.append(f"{address[0]}:{address[1]}={result.contacted}")

        async with MdnsDiscovery(
            node=name,
            cluster=cluster,
            advertise_host=host,
            gossip_port=transport.address[1],
            on_peer=join_peer,
        ) as discovery:
            while not stop.is_set():
                write_report(
                    report_path,
                    {
                        "name": name,
                        "cluster": cluster,
                        "alive": sorted(alive_members(transport)),
                        "joins": joins,
                        "discovery": asdict(discovery.statistics()),
                    },
                )
                try:
                    async with asyncio.timeout(REPORT_INTERVAL):
                        await stop.wait()
                except TimeoutError:
                    pass
    return 0


def alive_members(transport: GossipTransport) -> list[str]:
    return [m.name for m in transport.core.members() if m.state == MemberState.ALIVE]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--host", required=True, help="IPv4 address to bind and advertise")
    parser.add_argument("--report", required=True, type=Path)
    args = parser.parse_args(argv)
    configure_logging("info", "json", sys.stderr)
    return asyncio.run(run(args.name, args.cluster, args.host, args.report))


if __name__ == "__main__":
    sys.exit(main())
