"""``labvm monitor ...``: the monitoring service and one-off samples."""

from __future__ import annotations

import argparse
import json
import time


def _serve(args: argparse.Namespace) -> int:
    from ..monitor.service import main

    argv = [f"--{setting}" for setting in args.set or []]
    if args.config:
        argv.append(f"--config={args.config}")
    main(argv)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from ..monitor.collector import Collector

    c = Collector(node_name=args.node, state_dir=args.state_dir)
    try:
        c.sample()  # the first sample primes the CPU rates
        time.sleep(args.wait)
        print(json.dumps(c.sample().to_dict(), indent=2))
    finally:
        c.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``sample`` under the ``monitor`` command."""
    serve = subparsers.add_parser(
        "serve", help="run the monitor service (normally started by the hub)")
    serve.add_argument("--set", action="append", metavar="CLASS.TRAIT=VALUE",
                       help="a setting, e.g. Collector.node_name=n1 (repeatable)")
    serve.add_argument("--config", help="a traitlets config file (Python)")
    serve.set_defaults(func=_serve)
    sample = subparsers.add_parser("sample", help="print one sample of this node as JSON")
    sample.add_argument("--node", default="local", help="LabVMSpawner.node_name")
    sample.add_argument("--state-dir", default="/var/lib/labvm", help="LabVMSpawner.state_dir")
    sample.add_argument("--wait", type=float, default=1.0,
                        help="seconds between the two samples CPU rates are taken over")
    sample.set_defaults(func=_sample)


def run(args: argparse.Namespace) -> int:
    return args.func(args)
