"""The command lines: ``labvm`` (this module, for admins), and ``labvm-node`` (``node``).

Each part of ``labvm`` has its module here: ``storage``, ``monitor``, ``migrate``, ``nodes``.
"""

from __future__ import annotations

import argparse
import logging


def _image_build(args: argparse.Namespace) -> int:
    from .. import images

    tag = images.build_all()
    print(tag)
    return 0


def _image_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    import docker

    from .. import images
    from ..node import rootfs

    client = docker.from_env()
    keep = {images.image_id(client, name) for name in args.keep}
    for tree in rootfs.prune_rootfs(Path(args.state_dir) / "rootfs", keep):
        print(f"removed {tree}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labvm", description="LabVM administration")
    sub = parser.add_subparsers(dest="command", required=True)

    image = sub.add_parser("image", help="LabVM's container images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build the base and user images (cached by content)")
    build.set_defaults(func=_image_build)
    prune = image_sub.add_parser(
        "prune", help="delete unpacked image layers that no root uses and no kept image needs")
    prune.add_argument("--state-dir", default="/var/lib/labvm",
                       help="the node's LabVMSpawner.state_dir (default: %(default)s)")
    prune.add_argument("--keep", action="append", default=["labvm/user:latest"],
                       help="image whose layer stays (repeatable; default: labvm/user:latest)")
    prune.set_defaults(func=_image_prune)

    from . import monitor as monitor_cli
    from . import storage as storage_cli

    storage = sub.add_parser("storage", help="the layer store: merge, sync, versions, fsck")
    storage_cli.register(storage.add_subparsers(dest="storage_command", required=True))
    storage.set_defaults(func=storage_cli.run)

    monitor = sub.add_parser("monitor", help="the monitoring service and one-off samples")
    monitor_cli.register(monitor.add_subparsers(dest="monitor_command", required=True))
    monitor.set_defaults(func=monitor_cli.run)

    from . import service as service_cli

    service = sub.add_parser("install-service", help="run LabVM's hub or node as a systemd "
                             "service", description=service_cli.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    service_cli.register(service)

    from . import migrate as migrate_cli
    from . import nodes as nodes_cli

    node = sub.add_parser("node", help="enroll (join tokens), list and revoke nodes",
                          description=nodes_cli.__doc__)
    nodes_cli.register(node)
    node.set_defaults(func=nodes_cli.run)

    migrate = sub.add_parser(
        "migrate", help="move a user's server (and its root) to another node",
        description=migrate_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    migrate_cli.register(migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)

