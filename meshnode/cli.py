"""The ``meshnode`` command line: parse, then hand over. No logic lives here.

Heavy imports (aiohttp, the simulator) happen inside the subcommand that needs them,
so ``meshnode keygen`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshnode.client import Client
    from meshnode.config import AgentConfig


def _add_client_options(
    parser: argparse.ArgumentParser, *, formats: bool = True, nested: bool = False
) -> None:
    # A nested action parser (``services register``) takes the same options after the
    # action; SUPPRESS keeps its defaults from overwriting values given before it.
    default = argparse.SUPPRESS if nested else None
    parser.add_argument(
        "-http-addr",
        "--http-addr",
        default=default,
        help="agent API host:port (127.0.0.1:8500)",
    )
    parser.add_argument("-token", "--token", default=default, help="ACL token for writes")
    if formats:
        parser.add_argument(
            "-format",
            "--format",
            default=argparse.SUPPRESS if nested else "table",
            choices=["table", "json"],
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnode", description="meshnode service mesh")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    agent = commands.add_parser("agent", help="run the agent (meshnode agent --dev to try it)")
    from meshnode.config import add_agent_arguments

    add_agent_arguments(agent)
    commands.add_parser("keygen", help="print a new base64 gossip encryption key")
    # member and sim parse their own arguments (see main); listed here for --help.
    commands.add_parser("member", help="run one bare gossip member (meshnode member --help)")
    demo = commands.add_parser("demo", help="run a local 3-agent demo cluster")
    demo.add_argument("--forever", action="store_true", help="keep running until Ctrl-C")
    demo.add_argument("--members", type=int, default=3, help=argparse.SUPPRESS)
    commands.add_parser("sim", help="gossip simulator (meshnode sim --help)")
    proxy = commands.add_parser(
        "proxy", help="run a proxy worker in the foreground (with proxy.managed = false)"
    )
    proxy.add_argument(
        "-data-dir",
        "--data-dir",
        metavar="DIR",
        help="the agent's data_dir, where its proxy.sock is (default: $MESHNODE_DATA_DIR)",
    )
    proxy.add_argument(
        "-event-loop", "--event-loop", choices=["auto", "uvloop", "asyncio"], default="auto"
    )

    members = commands.add_parser("members", help="the members an agent sees")
    _add_client_options(members)
    services = commands.add_parser("services", help="list, register or deregister services")
    _add_client_options(services)
    services_commands = services.add_subparsers(dest="services_command", metavar="ACTION")
    register = services_commands.add_parser("register", help="register services from a file")
    register.add_argument("file", type=Path)
    _add_client_options(register, formats=False, nested=True)
    deregister = services_commands.add_parser("deregister", help="deregister a service by ID")
    deregister.add_argument("service_id")
    _add_client_options(deregister, formats=False, nested=True)
    listing = services_commands.add_parser("list", help="this agent's services (the default)")
    _add_client_options(listing, nested=True)
    catalog = commands.add_parser("catalog", help="the cluster's catalog")
    _add_client_options(catalog)
    catalog.add_argument("what", choices=["services", "nodes"])
    join = commands.add_parser("join", help="tell an agent to join a cluster")
    _add_client_options(join, formats=False)
    join.add_argument("addresses", nargs="+", metavar="ADDR")
    for name, text in (
        ("leave", "gracefully leave and stop the agent"),
        ("reload", "reload service definitions and checks"),
    ):
        _add_client_options(commands.add_parser(name, help=text), formats=False)
    info = commands.add_parser("info", help="the agent's configuration and statistics")
    _add_client_options(info)
    keyring = commands.add_parser("keyring", help="list, install, use or remove gossip keys")
    _add_client_options(keyring)
    keyring.add_argument("op", choices=["list", "install", "use", "remove"])
    keyring.add_argument("key", nargs="?")
    _add_intention_parser(commands)
    _add_config_parser(commands)
    _add_ca_parser(commands)
    return parser


def _add_intention_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    intention = commands.add_parser("intention", help="create, check, list or delete intentions")
    _add_client_options(intention)
    actions = intention.add_subparsers(dest="intention_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="allow (or -deny) SRC to connect to DST")
    verdict = create.add_mutually_exclusive_group()
    for flag in ("allow", "deny"):
        verdict.add_argument(
            f"-{flag}",
            f"--{flag}",
            dest="verdict",
            action="store_const",
            const=flag,
            help=f"{flag} the connection" + (" (the default)" if flag == "allow" else ""),
        )
    create.add_argument(
        "-replace", "--replace", action="store_true", help="replace an existing SRC => DST"
    )
    create.add_argument(
        "-file",
        "--file",
        metavar="FILE",
        help="the intention as JSON or HCL (Action, or Permissions for L7); - reads stdin",
    )
    create.add_argument("source", nargs="?", metavar="SRC")
    create.add_argument("destination", nargs="?", metavar="DST")
    _add_client_options(create, formats=False, nested=True)
    for name, text in (
        ("get", "show the intention from SRC to DST"),
        ("delete", "delete the intention from SRC to DST"),
        ("check", "would SRC be allowed to connect to DST? (exit 0 allowed, 2 denied)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("source", metavar="SRC")
        action.add_argument("destination", metavar="DST")
        _add_client_options(action, formats=name == "get", nested=True)
    _add_client_options(actions.add_parser("list", help="every intention"), nested=True)


def _add_config_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = commands.add_parser("config", help="write, read, list or delete config entries")
    _add_client_options(config)
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    write = actions.add_parser("write", help="create or update a config entry from a file")
    write.add_argument("file", metavar="FILE", help="JSON or HCL (.hcl); - reads stdin")
    _add_client_options(write, formats=False, nested=True)
    for name, text in (("read", "print a config entry as JSON"), ("delete", "delete one")):
        action = actions.add_parser(name, help=text)
        action.add_argument("-kind", "--kind", required=True, help="e.g. service-defaults")
        action.add_argument("-name", "--name", required=True)
        _add_client_options(action, formats=False, nested=True)
    listing = actions.add_parser("list", help="the names of one kind's config entries")
    listing.add_argument("-kind", "--kind", required=True, help="e.g. service-router")
    _add_client_options(listing, nested=True)


def _add_ca_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = commands.add_parser("ca", help="the mesh CA: roots, rotation and per-agent status")
    _add_client_options(ca)
    actions = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    _add_client_options(actions.add_parser("roots", help="the trusted CA roots"), nested=True)
    rotate = actions.add_parser("rotate", help="rotate to a new root; prints its ID")
    _add_client_options(rotate, formats=False, nested=True)
    status = actions.add_parser(
        "status", help="each agent's bundle and expiry (exit 2 if one lags or expires soon)"
    )
    _add_client_options(status, nested=True)


def _run_agent(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from meshnode.agent import run_agent
    from meshnode.config import load_config
    from meshnode.errors import ConfigError
    from meshnode.logging import configure_logging

    options = vars(args)
    cwd = Path.cwd()

    def load() -> AgentConfig:
        return load_config(options, os.environ, cwd=cwd)

    try:
        config = load()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(run_agent(config, load))
    except KeyboardInterrupt:
        return 130


def _run_proxy(args: argparse.Namespace) -> int:
    """Replace this process with ``python -m proxy --control <data_dir>/proxy.sock``:
    a worker that reconnects to its agent every second and serves its last snapshot
    meanwhile (stopped with Ctrl-C or SIGTERM)."""
    import os

    from meshnode.proxy_control import SOCKET_NAME

    data_dir = args.data_dir or os.environ.get("MESHNODE_DATA_DIR")
    if not data_dir:
        print("meshnode proxy: give -data-dir (the agent's data_dir)", file=sys.stderr)
        return 2
    socket_path = Path(data_dir).resolve() / SOCKET_NAME
    command = [sys.executable, "-m", "proxy", "--control", str(socket_path)]
    if args.event_loop != "auto":
        command += ["--event-loop", args.event_loop]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def _run_client(args: argparse.Namespace) -> int:
    import os

    from meshnode import client

    address = args.http_addr or os.environ.get("CONSUL_HTTP_ADDR") or client.DEFAULT_HTTP_ADDR
    api = client.Client(address, args.token)
    fmt = getattr(args, "format", "table")
    try:
        if args.command == "members":
            client.members(api, fmt)
        elif args.command == "services":
            action = args.services_command or "list"
            if action == "register":
                client.services_register(api, args.file)
            elif action == "deregister":
                client.services_deregister(api, args.service_id)
            else:
                client.services_list(api, fmt)
        elif args.command == "catalog":
            if args.what == "services":
                client.catalog_services(api, fmt)
            else:
                client.catalog_nodes(api, fmt)
        elif args.command == "join":
            client.join(api, args.addresses)
        elif args.command == "leave":
            client.leave(api)
        elif args.command == "reload":
            client.reload(api)
        elif args.command == "info":
            client.info(api, fmt)
        elif args.command == "keyring":
            if args.op != "list" and not args.key:
                print(f"meshnode keyring {args.op}: a KEY is required", file=sys.stderr)
                return 2
            client.keyring(api, args.op, args.key, fmt)
        elif args.command in ("intention", "config", "ca"):
            return _run_connect_client(api, args, fmt)
    except client.ClientError as exc:
        action = getattr(args, f"{args.command}_command", None)
        name = f"{args.command} {action}" if action else args.command
        message = " ".join(str(exc).split())  # one line, whatever the server sent
        print(f"meshnode {name}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _run_connect_client(api: Client, args: argparse.Namespace, fmt: str) -> int:
    """``intention``, ``config`` and ``ca``: their functions return the exit code."""
    from meshnode import client_connect as connect

    if args.command == "intention":
        action = args.intention_command
        if action == "create":
            return connect.intention_create(
                api,
                args.source,
                args.destination,
                action=args.verdict,
                replace=args.replace,
                file=args.file,
            )
        if action == "list":
            return connect.intention_list(api, fmt)
        if action == "get":
            return connect.intention_get(api, args.source, args.destination, fmt)
        if action == "delete":
            return connect.intention_delete(api, args.source, args.destination)
        return connect.intention_check(api, args.source, args.destination)
    if args.command == "config":
        action = args.config_command
        if action == "write":
            return connect.config_write(api, args.file)
        if action == "read":
            return connect.config_read(api, args.kind, args.name)
        if action == "delete":
            return connect.config_delete(api, args.kind, args.name)
        return connect.config_list(api, args.kind, fmt)
    if args.ca_command == "roots":
        return connect.ca_roots(api, fmt)
    if args.ca_command == "rotate":
        return connect.ca_rotate(api)
    return connect.ca_status(api, fmt)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "sim":
        # Everything after "sim" is the simulator's own command line.
        from gossip import sim

        return sim.main(args_list[1:])
    if args_list and args_list[0] == "member":
        from meshnode import member

        return member.main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "agent":
        return _run_agent(args)
    if args.command == "keygen":
        from gossip.keyring import generate_key

        print(generate_key())
        return 0
    if args.command == "proxy":
        return _run_proxy(args)
    if args.command == "demo":
        from meshnode import demo

        return demo.main(size=args.members, forever=args.forever)
    return _run_client(args)


if __name__ == "__main__":
    sys.exit(main())
