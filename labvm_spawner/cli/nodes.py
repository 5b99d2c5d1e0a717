"""``labvm node ...`` on the hub: join tokens, the enrolled nodes, revocation.

They work on LabVM's database (the hub's and the admin service's), so run them on
the hub as root. The admin Nodes page does the same with buttons.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..db import default_url
from ..errors import LabVMError

DEFAULT_DB = default_url("/var/lib/labvm")


def register(parser: argparse.ArgumentParser) -> None:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db-url", default=os.environ.get("LABVM_DB_URL", DEFAULT_DB),
                    help="LabVM's database (LabVMSpawner.db_url; default %(default)s)")
    sub = parser.add_subparsers(dest="node_command", required=True)
    tok = sub.add_parser("join-token", parents=[db],
                         help="make a one-time token for NODE to enroll with")
    tok.add_argument("node")
    tok.add_argument("--ttl", type=float, default=3600, help="seconds it stays valid (3600)")
    tok.set_defaults(node_func=_join_token)
    ls = sub.add_parser("list", parents=[db],
                        help="the enrolled nodes, their URLs and certificates")
    ls.set_defaults(node_func=_list)
    rv = sub.add_parser("revoke", parents=[db], help="stop trusting NODE at once")
    rv.add_argument("node")
    rv.set_defaults(node_func=_revoke)


def _cluster(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..cluster import Cluster

    return Cluster(args.db_url)


def _who() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or "root"


def _join_token(args: argparse.Namespace) -> int:
    made = _cluster(args).make_join_token(args.node, _who(), args.ttl)
    left = int(made["expires"] - time.time())
    print(made["token"])
    print(f"(for node {args.node}, valid once, for {left} s: on the node run "
          "labvm-node join --token-file FILE ...)", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    for n in _cluster(args).enrolled(revoked=True).values():
        state = f"revoked by {n['revoked_by']}" if n["revoked_at"] else "enrolled"
        print(f"{n['name']}\t{n['url']}\t{state}\t{n['fingerprint']}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    _cluster(args).revoke(args.node, _who())
    print(f"node {args.node} revoked")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return args.node_func(args)
    except LabVMError as e:
        print(f"labvm node: {e}", file=sys.stderr)
        return 2
