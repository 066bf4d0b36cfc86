"""The CLI's side of the agent's HTTP API: small synchronous calls and table output.

Every command talks to one agent (``--http-addr``, default 127.0.0.1:8500) and prints
a human table, or JSON with ``-format=json``. Errors print one line naming the URL
and exit 1.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

DEFAULT_HTTP_ADDR: Final = "127.0.0.1:8500"
TIMEOUT: Final = 10.0


class ClientError(Exception):
    """An API call failed; the message says which and why."""


class Client:
    """Synchronous calls to one agent's HTTP API."""

    def __init__(self, http_addr: str = DEFAULT_HTTP_ADDR, token: str | None = None) -> None:
        if "://" not in http_addr:
            http_addr = "http://" + http_addr
        self.base = http_addr.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if self.token:
            request.add_header("X-Consul-Token", self.token)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise ClientError(f"{method} {path}: {exc.code} {detail}") from None
        except (OSError, ValueError) as exc:
            raise ClientError(f"{method} {self.base}{path}: {exc}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")


def print_table(rows: Sequence[Sequence[object]], out: Any = None) -> None:
    """Columns padded to their widest cell; the first row is the header."""
    out = out or sys.stdout
    text = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in text) for i in range(len(text[0]))]
    for row in text:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _emit(data: object, fmt: str, rows: Sequence[Sequence[object]]) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_table(rows)


SERF_STATUS: Final = {1: "alive", 2: "leaving", 3: "left", 4: "failed"}


def members(client: Client, fmt: str) -> None:
    data = client.call("GET", "/v1/agent/members")
    rows: list[list[object]] = [["Node", "Address", "Status"]]
    for m in data:
        status = m.get("State") or SERF_STATUS.get(m.get("Status"), "unknown")
        host = str(m["Addr"])
        address = f"[{host}]:{m['Port']}" if ":" in host else f"{host}:{m['Port']}"
        rows.append([m["Name"], address, status])
    _emit(data, fmt, rows)


def services_list(client: Client, fmt: str) -> None:
    data = client.call("GET", "/v1/agent/services")
    rows: list[list[object]] = [["ID", "Service", "Address", "Port", "Tags"]]
    for service_id, s in sorted(data.items()):
        rows.append(
            [service_id, s["Service"], s.get("Address", ""), s.get("Port", 0), ",".join(s["Tags"])]
        )
    _emit(data, fmt, rows)


def services_register(client: Client, path: Path) -> None:
    """Register every service in a JSON file: one definition, ``{"service": {...}}``
    or ``{"services": [...]}`` (Consul's service definition files)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ClientError(f"{path}: {exc}") from None
    if isinstance(document, dict) and "services" in document:
        definitions = document["services"]
    elif isinstance(document, dict) and "service" in document:
        definitions = [document["service"]]
    else:
        definitions = [document]
    for definition in definitions:
        client.call("PUT", "/v1/agent/service/register", definition)
        name = (
            definition.get("Name") or definition.get("name") if isinstance(definition, dict) else ""
        )
        print(f"Registered service: {name}")


def services_deregister(client: Client, service_id: str) -> None:
    client.call("PUT", f"/v1/agent/service/deregister/{urllib.parse.quote(service_id, safe='')}")
    print(f"Deregistered service: {service_id}")


def catalog_services(client: Client, fmt: str) -> None:
    data = client.call("GET", "/v1/catalog/services")
    rows: list[list[object]] = [["Service", "Tags"]]
    rows += [[name, ",".join(tags)] for name, tags in sorted(data.items())]
    _emit(data, fmt, rows)


def catalog_nodes(client: Client, fmt: str) -> None:
    data = client.call("GET", "/v1/catalog/nodes")
    rows: list[list[object]] = [["Node", "ID", "Address", "DC"]]
    rows += [[n["Node"], n["ID"][:8], n["Address"], n["Datacenter"]] for n in data]
    _emit(data, fmt, rows)


def join(client: Client, addresses: Sequence[str]) -> None:
    for address in addresses:
        client.call("PUT", f"/v1/agent/join/{urllib.parse.quote(address, safe='')}")
    print(f"Successfully joined cluster by contacting {len(addresses)} nodes.")


def leave(client: Client) -> None:
    client.call("PUT", "/v1/agent/leave")
    print("Graceful leave complete")


def reload(client: Client) -> None:
    client.call("PUT", "/v1/agent/reload")
    print("Configuration reload triggered")


def info(client: Client, fmt: str) -> None:
    data = client.call("GET", "/v1/agent/self")
    if fmt == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    for section in ("Config", "Member", "Stats"):
        print(f"{section.lower()}:")
        for key, value in sorted(data.get(section, {}).items()):
            if isinstance(value, dict):
                for sub, subvalue in sorted(value.items()):
                    print(f"\t{key}.{sub} = {subvalue}")
            else:
                print(f"\t{key} = {value}")


def keyring(client: Client, op: str, key: str | None, fmt: str, wait: float = 30.0) -> None:
    """Consul's ``keyring`` command over ``/v1/operator/keyring``.

    A change is made at this agent and spreads by gossip; for ``install`` and ``use``
    the command then waits (up to ``wait`` seconds) until every live member reports
    the key, so the next rotation step is safe to take.
    """
    method = {"list": "GET", "install": "POST", "use": "PUT", "remove": "DELETE"}[op]
    body = None if op == "list" else {"Key": key}
    data = client.call(method, "/v1/operator/keyring", body)
    if op == "list":
        rows: list[list[object]] = [["Key", "Members", "Primary on"]]
        for entry in data or []:
            total = entry.get("NumNodes", "?")
            primaries = entry.get("PrimaryKeys", {})
            for k, count in sorted(entry.get("Keys", {}).items()):
                rows.append([k, f"{count}/{total}", f"{primaries.get(k, 0)}/{total}"])
        _emit(data, fmt, rows)
        return
    field = {"install": "Keys", "use": "PrimaryKeys"}.get(op)
    if field is None:
        print(f"{op}: done")
        return
    deadline = time.monotonic() + wait
    while True:
        status = client.call("GET", "/v1/operator/keyring")[0]
        have, total = status.get(field, {}).get(key, 0), status.get("NumNodes", 0)
        if have >= total:
            print(f"{op}: done on {have}/{total} members")
            return
        if time.monotonic() > deadline:
            raise ClientError(f"{op}: only {have}/{total} members after {wait:.0f} s")
        time.sleep(0.2)
