"""The ``meshnode`` command line: parse, then hand over. No logic lives here.

Heavy imports (aiohttp, the simulator) happen inside the subcommand that needs them,
so ``meshnode keygen`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnode", description="meshnode service mesh")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("keygen", help="print a new base64 gossip encryption key")
    # member and sim parse their own arguments (see main); listed here for --help.
    commands.add_parser("member", help="run one gossip member (meshnode member --help)")
    demo = commands.add_parser("demo", help="run a local 5-member demo cluster")
    demo.add_argument("--forever", action="store_true", help="keep running until Ctrl-C")
    demo.add_argument("--members", type=int, default=5, help=argparse.SUPPRESS)
    commands.add_parser("sim", help="gossip simulator (meshnode sim --help)")
    members = commands.add_parser("members", help="list the members a running member sees")
    members.add_argument("--http-addr", default="127.0.0.1:8500", help="member API host:port")
    members.add_argument("-format", "--format", default="table", choices=["table", "json"])
    return parser


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
    if args.command == "keygen":
        from gossip.keyring import generate_key

        print(generate_key())
        return 0
    if args.command == "demo":
        from meshnode import demo

        return demo.main(size=args.members, forever=args.forever)
    if args.command == "members":
        from meshnode import member

        return member.print_members(args.http_addr, args.format)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
