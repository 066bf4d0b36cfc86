"""The CLI's policy and CA commands: ``intention``, ``config`` and ``ca``.

Consul's CLI is the model (``consul intention``, ``consul config``): the same flags,
Consul's messages where it has one, and its exit codes: ``intention check`` exits 2
when the connection would be denied. ``ca status`` exits 2 when an agent lags the
cluster's trust bundle or holds a certificate about to expire, so a monitoring check
can run it as it is. Every other failure raises ``ClientError`` (one line; the CLI
prints it and exits 1).

Files (``config write``, ``intention create -file``) are JSON or HCL, read by
``meshnode.hclconv``; ``-`` is standard input.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from meshnode.client import Client, ClientError, print_table
from meshnode.hclconv import HclError, normalize_key, parse_document

#: ``consul intention check`` exits 2 for "Denied" (0 allowed, 1 error).
EXIT_DENIED: Final = 2
#: ``ca status`` exits 2 when an agent lags or a certificate expires soon; 1 stays
#: "the command failed", as for every command.
EXIT_UNHEALTHY: Final = 2
#: Enough of a bundle fingerprint to tell two bundles apart at a glance.
FINGERPRINT_PREFIX: Final = 16
STDIN: Final = "-"


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def read_document(path: str) -> dict[str, Any]:
    """The JSON object in a JSON or HCL file (``-``: standard input)."""
    try:
        text = sys.stdin.read() if path == STDIN else Path(path).read_text()
    except OSError as exc:
        raise ClientError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ClientError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        return parse_document(text, "(stdin)" if path == STDIN else path)
    except HclError as exc:
        raise ClientError(str(exc)) from None


def _field(document: Mapping[str, Any], name: str) -> Any:
    """A field matched as the agent matches keys (``kind`` is Kind)."""
    wanted = normalize_key(name)
    for key, value in document.items():
        if normalize_key(key) == wanted:
            return value
    return None


def _object(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ClientError(f"{what}: expected a JSON object, got {json.dumps(data)[:80]}")
    return data


def _list(data: object, what: str) -> list[dict[str, Any]]:
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ClientError(f"{what}: expected a list of objects, got {json.dumps(data)[:80]}")
    return data


# --------------------------------------------------------------------------- intention


def _exact(source: str, destination: str, endpoint: str = "exact") -> str:
    query = urllib.parse.urlencode({"source": source, "destination": destination})
    return f"/v1/connect/intentions/{endpoint}?{query}"


def _verdict(intention: Mapping[str, Any]) -> str:
    """``allow``, ``deny`` or, for an L7 intention, how many permissions it has."""
    action = _field(intention, "Action")
    if action:
        return str(action)
    permissions = _field(intention, "Permissions") or []
    return f"L7: {len(permissions)} permission{'s' if len(permissions) != 1 else ''}"


def _described(intention: Mapping[str, Any]) -> str:
    """Consul's ``web => db (allow)``."""
    source = _field(intention, "SourceName")
    destination = _field(intention, "DestinationName")
    return f"{source} => {destination} ({_verdict(intention)})"


def intention_body(
    source: str | None,
    destination: str | None,
    action: str | None,
    document: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``PUT /v1/connect/intentions/exact`` body for ``intention create``.

    Without a file: SRC, DST and ``action`` (allow unless -deny). With one: the file's
    intention, whose Action or L7 Permissions decide (so -allow/-deny is refused), and
    SRC/DST, when given, fill in or must agree with its SourceName/DestinationName.
    """
    if document is None:
        if not source or not destination:
            raise ClientError("SRC and DST are required (or -file with SourceName/DestinationName)")
        return {"SourceName": source, "DestinationName": destination, "Action": action or "allow"}
    if action is not None:
        raise ClientError(
            f"-{action} cannot be combined with -file: the file's Action or Permissions decide"
        )
    body = dict(document)
    for name, given in (("SourceName", source), ("DestinationName", destination)):
        in_file = _field(body, name)
        if given and in_file and in_file != given:
            raise ClientError(f"the file's {name} {in_file!r} disagrees with {given!r}")
        if not given and not in_file:
            raise ClientError(f"no {name}: give SRC and DST or set {name} in the file")
        if not in_file:
            body[name] = given
    has_action = _field(body, "Action") is not None
    has_permissions = _field(body, "Permissions") is not None
    if has_action == has_permissions:
        raise ClientError("an intention needs exactly one of Action and Permissions")
    return body


def intention_create(
    client: Client,
    source: str | None,
    destination: str | None,
    *,
    action: str | None = None,
    replace: bool = False,
    file: str | None = None,
) -> int:
    document = read_document(file) if file is not None else None
    body = intention_body(source, destination, action, document)
    source, destination = _field(body, "SourceName"), _field(body, "DestinationName")
    if not replace:
        # Consul's create refuses an existing pair unless -replace; the exact PUT upserts.
        for existing in _list(client.call("GET", "/v1/connect/intentions"), "intentions"):
            if (existing.get("SourceName"), existing.get("DestinationName")) == (
                source,
                destination,
            ):
                raise ClientError(
                    f"an intention from {source} to {destination} already exists"
                    " (use -replace to replace it)"
                )
    client.call("PUT", _exact(source, destination), body)
    print(f"Created: {_described(body)}")
    return 0


def intention_delete(client: Client, source: str, destination: str) -> int:
    client.call("DELETE", _exact(source, destination))
    print("Intention deleted.")
    return 0


def intention_get(client: Client, source: str, destination: str, fmt: str) -> int:
    data = _object(client.call("GET", _exact(source, destination)), "intention")
    if fmt == "json":
        _print_json(data)
        return 0
    lines: list[tuple[str, object]] = [
        ("Source", data.get("SourceName", "")),
        ("Destination", data.get("DestinationName", "")),
        ("Action", _verdict(data)),
    ]
    lines += [
        (label, data[key]) for label, key in _OPTIONAL_FIELDS if data.get(key) not in (None, "")
    ]
    width = max(len(label) for label, _ in lines) + 3  # the colon, two blanks
    for label, value in lines:
        print(f"{label + ':':<{width}}{value}")
    permissions = data.get("Permissions") or []
    if permissions:
        print("Permissions:")
        for permission in permissions:
            print(f"  {json.dumps(permission, sort_keys=True)}")
    return 0


_OPTIONAL_FIELDS: Final = (
    ("ID", "ID"),
    ("Description", "Description"),
    ("Precedence", "Precedence"),
    ("Created At", "CreatedAt"),
)


def intention_list(client: Client, fmt: str) -> int:
    data = _list(client.call("GET", "/v1/connect/intentions"), "intentions")
    if fmt == "json":
        _print_json(data)
        return 0
    if not data:
        print("There are no intentions.")
        return 0
    with_id = any(intention.get("ID") for intention in data)
    header: list[object] = ["Source", "Action", "Destination", "Precedence"]
    rows: list[list[object]] = [["ID", *header] if with_id else header]
    for intention in data:
        row: list[object] = [
            intention.get("SourceName", ""),
            _verdict(intention),
            intention.get("DestinationName", ""),
            intention.get("Precedence", ""),
        ]
        rows.append([intention.get("ID") or "-", *row] if with_id else row)
    print_table(rows)
    return 0


def intention_check(client: Client, source: str, destination: str) -> int:
    data = _object(client.call("GET", _exact(source, destination, "check")), "check")
    allowed = data.get("Allowed")
    if not isinstance(allowed, bool):
        raise ClientError(f"check: expected Allowed true or false, got {json.dumps(data)[:80]}")
    print("Allowed" if allowed else "Denied")
    return 0 if allowed else EXIT_DENIED


# --------------------------------------------------------------------------- config


def _entry_path(kind: str, name: str | None = None) -> str:
    path = f"/v1/config/{urllib.parse.quote(kind, safe='')}"
    return path if name is None else f"{path}/{urllib.parse.quote(name, safe='')}"


def config_write(client: Client, file: str) -> int:
    entry = read_document(file)
    kind, name = _field(entry, "Kind"), _field(entry, "Name")
    if not isinstance(kind, str) or not kind or not isinstance(name, str) or not name:
        where = "(stdin)" if file == STDIN else file
        raise ClientError(f"{where}: a config entry needs a Kind and a Name")
    if client.call("PUT", "/v1/config", entry) is False:
        raise ClientError(f"config entry not updated: {kind}/{name}")
    print(f"Config entry written: {kind}/{name}")
    return 0


def config_read(client: Client, kind: str, name: str) -> int:
    """The entry as JSON (``consul config read`` has no table form)."""
    _print_json(client.call("GET", _entry_path(kind, name)))
    return 0


def config_delete(client: Client, kind: str, name: str) -> int:
    client.call("DELETE", _entry_path(kind, name))
    print(f"Config entry deleted: {kind}/{name}")
    return 0


def config_list(client: Client, kind: str, fmt: str) -> int:
    data = _list(client.call("GET", _entry_path(kind)), "config entries")
    if fmt == "json":
        _print_json(data)
        return 0
    for entry in data:
        print(_field(entry, "Name"))
    return 0


# --------------------------------------------------------------------------- ca


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def ca_roots(client: Client, fmt: str) -> int:
    data = _object(client.call("GET", "/v1/agent/connect/ca/roots"), "CA roots")
    roots = _list(data.get("Roots"), "CA roots")
    if fmt == "json":
        _print_json(data)
        return 0
    rows: list[list[object]] = [["ID", "Name", "Active", "Not After"]]
    for root in roots:
        rows.append(
            [
                root.get("ID", ""),
                root.get("Name", ""),
                _yes_no(root.get("Active")),
                root.get("NotAfter", ""),
            ]
        )
    print(f"Trust domain: {data.get('TrustDomain', '')}")
    print_table(rows)
    return 0


def ca_rotate(client: Client) -> int:
    """Start a root rotation; prints only the new active root's ID (for scripts)."""
    data = _object(client.call("PUT", "/v1/mesh/ca/rotate"), "rotate")
    root = data.get("ActiveRootID")
    if not root:
        raise ClientError(f"rotate: no ActiveRootID in {json.dumps(data)[:80]}")
    print(root)
    return 0


def ca_status(client: Client, fmt: str) -> int:
    """Per agent: its bundle, whether that is the cluster's, its soonest certificate
    expiry. Exit 2 when the agent reports any agent lagging or expiring soon."""
    data = _object(client.call("GET", "/v1/mesh/ca/status"), "CA status")
    agents = _list(data.get("Agents"), "CA status agents")
    bundle = str(data.get("BundleFingerprint") or "")
    lagging = sum(1 for agent in agents if agent.get("Lagging"))
    expiring = sum(1 for agent in agents if agent.get("ExpiringSoon"))
    # The per-agent flags and the summary counts are both the agent's judgement; either
    # one raising the alarm is enough.
    unhealthy = bool(lagging or expiring or data.get("Lagging") or data.get("ExpiringSoon"))
    if fmt == "json":
        _print_json(data)
        return EXIT_UNHEALTHY if unhealthy else 0
    rows: list[list[object]] = [["Node", "Bundle", "In Sync", "Soonest Expiry", "Flags"]]
    in_sync = 0
    for agent in agents:
        fingerprint = str(agent.get("BundleFingerprint") or "")
        same = bool(bundle) and fingerprint == bundle
        in_sync += same
        flags = [
            flag
            for flag, key in (("lagging", "Lagging"), ("expiring-soon", "ExpiringSoon"))
            if agent.get(key)
        ]
        rows.append(
            [
                agent.get("Node", ""),
                fingerprint[:FINGERPRINT_PREFIX] or "-",
                _yes_no(same),
                agent.get("SoonestExpiry") or "-",
                ",".join(flags) or "-",
            ]
        )
    print(f"Cluster bundle: {bundle[:FINGERPRINT_PREFIX] or '-'}")
    print_table(rows)
    print(
        f"{in_sync}/{len(agents)} agents in sync, "
        f"{data.get('Lagging', lagging)} lagging, "
        f"{data.get('ExpiringSoon', expiring)} expiring soon"
    )
    return EXIT_UNHEALTHY if unhealthy else 0
