"""``labvm-node``: a node's command line.

* ``serve``: run the agent (``node.agent``), with the node settings of ``NodeSettings``;
* ``join``: enroll with the hub once, with a join token an admin made;
* ``doctor``, ``network-policy remove``: the container network policy;
* ``make-key``, ``token-hash``, ``join-token``, ``revoke``: the hub's side of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from traitlets import Float, List, TraitError, Unicode
from traitlets.config import Application

from .. import names
from ..errors import LabVMError
from ..node import auth, netpolicy
from ..node.agent import serve
from ..node.ops import NodeOps
from ..node.settings import NodeSettings


def _tokens(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="labvm-node", description="the hub's node key")
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-key", help="make the hub's node key file (mode 600)")
    mk.add_argument("path")
    th = sub.add_parser("token-hash", help="print the SHA-256 of a node's token, for "
                        "that node's --token-hash-file")
    th.add_argument("node")
    th.add_argument("--key-file", required=True)
    a = p.parse_args(argv)
    if a.cmd == "make-key":
        auth.make_key(a.path)
    else:
        if not names.is_node_name(a.node):
            p.error(f"invalid node name {a.node!r}")
        print(auth.token_hash(auth.node_token(auth.load_key(a.key_file), a.node)))


def _join(argv: list[str]) -> None:
    """Enroll this node with the hub, once: its certificate and the admin's join token."""
    p = argparse.ArgumentParser(prog="labvm-node join", description=_join.__doc__)
    p.add_argument("--name", required=True, help="this node's name (as the token was made)")
    p.add_argument("--url", required=True, help="https://ADDRESS:PORT the hub reaches us at")
    p.add_argument("--hub-url", required=True, help="the hub's public URL (https in "
                   "production: the token travels to it)")
    p.add_argument("--token-file", required=True,
                   help="file holding the join token (deleted once it is used)")
    p.add_argument("--token-hash-file", required=True,
                   help="where to keep the hash of the token the hub will call us with")
    p.add_argument("--state-dir", default="/var/lib/labvm", help="node-local state directory")
    p.add_argument("--tls-dir", default="", help="certificate directory (<state-dir>/tls)")
    p.add_argument("--hub-ca", default="", help="CA bundle for the hub's certificate")
    p.add_argument("--service", default="labvm-monitor", help="the hub's LabVM admin service")
    a = p.parse_args(argv)
    if not names.is_node_name(a.name):
        p.error(f"invalid node name {a.name!r}")
    address = a.url.split("//", 1)[-1].rsplit(":", 1)[0].strip("[]")
    cert, _key = auth.ensure_cert(a.tls_dir or f"{a.state_dir}/tls", a.name, address)
    token_file = Path(a.token_file)
    body = json.dumps({"name": a.name, "url": a.url, "cert": cert.read_text(),
                       "token": token_file.read_text().strip()}).encode()
    url = f"{a.hub_url.rstrip('/')}/services/{a.service}/api/nodes/enroll"
    ctx = ssl.create_default_context(cafile=a.hub_ca or None)
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("message") or e.reason
        except ValueError:
            msg = e.reason
        raise LabVMError(f"the hub refused to enroll {a.name}: {msg}") from None
    except (urllib.error.URLError, OSError) as e:
        raise LabVMError(f"cannot reach the hub at {a.hub_url}: {e}") from None
    th = Path(a.token_hash_file)
    th.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(th, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(answer["token_hash"] + "\n")
    token_file.unlink(missing_ok=True)
    print(f"enrolled node {answer['node']} at {answer['url']}; certificate "
          f"{answer['fingerprint']}")


def _doctor(argv: list[str]) -> None:
    """Check this node: dockerd with userns-remap, the MooseFS mount, the NVIDIA runtime
    where GPUs exist, the clock against the hub, free disk for uppers, enrollment, and the
    container network policy. Each problem comes with its fix; exit 1 if any."""
    from ..node import doctor

    hub_url = ""
    if "--hub-url" in argv:
        i = argv.index("--hub-url")
        hub_url = argv[i + 1] if i + 1 < len(argv) else ""
        argv = argv[:i] + argv[i + 2:]
    agent = NodeAgent()
    agent.initialize(argv)  # the same settings (and --config) as `serve`
    checks = doctor.run_all(agent, hub_url)
    for check in checks:
        print(check.line())
    bridges = [c.detail.rsplit(" ", 1)[-1] for c in checks
               if c.what == "container network policy" and c.ok]
    for bridge in bridges:
        print(netpolicy.show(bridge))
    if not all(c.ok for c in checks):
        sys.exit(1)


def _network_policy(argv: list[str]) -> None:
    """remove: take LabVM's container network policy out of iptables."""
    p = argparse.ArgumentParser(prog="labvm-node network-policy",
                                description=_network_policy.__doc__)
    p.add_argument("action", choices=["remove"])
    p.parse_args(argv)
    netpolicy.remove()
    print("removed the container network policy (LABVM-FWD, LABVM-IN and their jumps)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("join-token", "revoke"):
        # Hub-side commands, here too because admins look for them next to `join`.
        from . import nodes as nodes_cli

        p = argparse.ArgumentParser(prog="labvm-node")
        nodes_cli.register(p)
        sys.exit(nodes_cli.run(p.parse_args(argv)))
    commands = {"join": _join, "doctor": _doctor, "network-policy": _network_policy}
    if argv and argv[0] in commands:
        try:
            commands[argv[0]](argv[1:])
        except (LabVMError, OSError) as e:
            sys.exit(f"labvm-node: {e}")
        return
    if argv and argv[0] in ("make-key", "token-hash"):
        try:
            _tokens(argv)
        except (LabVMError, OSError) as e:
            sys.exit(f"labvm-node: {e}")
        return
    if argv and argv[0] == "serve":
        argv = argv[1:]
    agent = NodeAgent()
    try:
        agent.initialize(argv)
        agent.start()
    except (LabVMError, TraitError) as e:
        sys.exit(f"labvm-node serve: {e}")


class NodeAgent(NodeSettings, Application):
    """labvm-node serve: run this node's agent (the node settings are ``NodeSettings``)."""

    name = "labvm-node serve"
    description = "Serve this node's engine to the hub over HTTPS, heartbeat and sync."

    listen = Unicode("0.0.0.0:8741", help="HOST:PORT to listen on.").tag(config=True)
    url = Unicode("", help="https://ADDRESS:PORT the hub reaches this agent at (the URL it "
                  "enrolled with).").tag(config=True)
    token_hash_file = Unicode("", help="File with the SHA-256 of this node's token "
                              "(written by labvm-node join).").tag(config=True)
    registry_dir = Unicode("", help="The shared directory where nodes write their heartbeat "
                           "records.").tag(config=True)
    tls_dir = Unicode("", help="Certificate directory (default <state_dir>/tls).").tag(
        config=True)
    heartbeat = Float(3.0, help="Seconds between heartbeats.").tag(config=True)
    config_file = Unicode("", help="A config file of these settings (c.NodeAgent.<setting> "
                          "= ...), as `labvm install-service node` makes.").tag(config=True)
    hub_api = List(Unicode(), help="The hub's API as containers reach it (IP:PORT): the one "
                   "address on the cluster's networks they may connect to.").tag(config=True)

    aliases = {
        "name": "NodeAgent.node_name", "listen": "NodeAgent.listen", "url": "NodeAgent.url",
        "token-hash-file": "NodeAgent.token_hash_file",
        "registry-dir": "NodeAgent.registry_dir", "tls-dir": "NodeAgent.tls_dir",
        "heartbeat": "NodeAgent.heartbeat", "hub-api": "NodeAgent.hub_api",
        "docker-url": "NodeAgent.docker_url", "state-dir": "NodeAgent.state_dir",
        "store-root": "NodeAgent.store_root", "image-layer-dir": "NodeAgent.image_layer_dir",
        "cached-store-root": "NodeAgent.cached_store_root",
        "db-url": "NodeAgent.db_url", "network": "NodeAgent.network_name",
        "dev-root": "NodeAgent.dev_root", "nvidia-runtime": "NodeAgent.nvidia_runtime",
        "userns-remap-user": "NodeAgent.userns_remap_user",
        "container-uid": "NodeAgent.container_uid", "stop-timeout": "NodeAgent.stop_timeout",
        "capability": "NodeAgent.capabilities", "secrets-root": "NodeAgent.secrets_root",
        "sync-interval": "NodeAgent.sync_interval",
        "lease-grace": "NodeAgent.lease_grace",
        "aside-max-age-days": "NodeAgent.aside_max_age_days",
        "housekeeping-interval": "NodeAgent.housekeeping_interval",
        "concurrent-starts": "NodeAgent.concurrent_starts",
        "cluster-net": "NodeAgent.cluster_networks",
        "allow-net": "NodeAgent.container_allow_networks",
        "allow-image": "NodeAgent.allowed_images", "publish-ip": "NodeAgent.publish_ip",
        "config": "NodeAgent.config_file",
    }

    def initialize(self, argv: list[str] | None = None) -> None:
        self.parse_command_line(argv)
        if self.config_file:
            if not Path(self.config_file).is_file():
                raise LabVMError(f"no config file {self.config_file}")
            self.load_config_file(self.config_file)
            self.parse_command_line(argv)  # the command line wins over the file
    flags = {"gpu-sharing": ({"NodeAgent": {"gpu_sharing": True}},
                             "Allow several users on one GPU."),
             "housekeeping-repair": ({"NodeAgent": {"housekeeping_repair": True}},
                                     "Let the scheduled fsck repair what it finds.")}

    def start(self) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        given = {"name": self.node_name != "local", "url": self.url,
                 "token-hash-file": self.token_hash_file, "registry-dir": self.registry_dir,
                 "hub-api": self.hub_api}
        missing = [f"--{flag}" for flag, value in given.items() if not value]
        if missing:
            raise LabVMError("missing " + ", ".join(missing) + " (see --help)")
        token_hash = Path(self.token_hash_file).read_text().strip()
        if len(token_hash) != 64:
            raise LabVMError(f"{self.token_hash_file} does not hold a SHA-256 hex digest")
        ops = NodeOps(self.node_config(hub_api=self.hub_api))
        asyncio.run(serve(ops, self.listen, self.url, token_hash,
                          self.tls_dir or f"{self.state_dir}/tls", self.registry_dir,
                          self.heartbeat))


if __name__ == "__main__":
    main()
