"""What user containers may reach over the network: iptables chains a node installs.

Without them, containers reach everything their node reaches through Docker's NAT:
the MooseFS master and chunkservers (which have no authentication of their own),
other nodes' agents, the hub's other ports, the node's own services and the LAN.
The policy, for traffic coming from the containers' bridge:

* replies to connections made to a container (the hub's proxy reaching Jupyter) pass;
* the hub's API address and port, and the node's DNS servers, can be reached;
* the cluster's own networks (by default those of the node's interfaces, plus any
  named with ``cluster_nets``, such as the storage network) are refused, except for
  the ``allow_nets`` the lab lists (a package mirror inside them, say);
* other containers (the ``container_nets``: the Docker networks of LabVM's nodes on this
  host) are refused, and logged to the kernel log (``labvm refused:``, rate-limited), so
  an admin sees who knocked on whose sshd or Jupyter; Docker's own inter-container rule
  would only drop them, silently;
* anything outside them (the package mirrors on the internet) can be reached;
* the node itself is refused on every port but the hub's API (when the hub runs on it).

Forwarded traffic goes through ``LABVM-FWD``, jumped to from Docker's ``DOCKER-USER``
chain, which dockerd keeps as it is across restarts; traffic to the node itself goes
through ``LABVM-IN``, jumped to from ``INPUT``. Installing is idempotent and only
adds; ``remove`` takes both chains and their jumps away. IPv4 only: LabVM's Docker
network has no IPv6.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import docker

from ..errors import LabVMError

FWD, IN = "LABVM-FWD", "LABVM-IN"
# New connections only, and at most a few lines a second: a container must not be able
# to flood the node's kernel log.
_LOG = ["-m", "conntrack", "--ctstate", "NEW", "-m", "limit", "--limit", "10/min",
        "--limit-burst", "20", "-j", "LOG", "--log-prefix", "labvm refused: "]
_DOCKER_BRIDGE_OPTION = "com.docker.network.bridge.name"


@dataclass
class Policy:
    """Where containers on ``bridge`` may go (see the module's description)."""

    bridge: str
    hub_api: list[tuple[str, int]] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    cluster_nets: list[str] = field(default_factory=list)
    allow_nets: list[str] = field(default_factory=list)
    local_addresses: set[str] = field(default_factory=set)
    container_nets: list[str] = field(default_factory=list)

    def rules(self) -> dict[str, list[list[str]]]:
        """The rules of both chains, in order (what ``install`` makes them hold)."""
        fwd = [["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"]]
        inp = [["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]]
        for ip in self.dns:
            for proto in ("udp", "tcp"):
                rule = ["-d", f"{ip}/32", "-p", proto, "-m", proto, "--dport", "53"]
                (inp if ip in self.local_addresses else fwd).append(
                    rule + ["-j", "ACCEPT" if ip in self.local_addresses else "RETURN"])
        for ip, port in self.hub_api:
            rule = ["-d", f"{ip}/32", "-p", "tcp", "-m", "tcp", "--dport", str(port)]
            if ip in self.local_addresses:
                inp.append(rule + ["-j", "ACCEPT"])
            else:
                fwd.append(rule + ["-j", "RETURN"])
        for net in self.container_nets:
            fwd.append(["-d", net, *_LOG])
            fwd.append(["-d", net, "-j", "REJECT", "--reject-with", "icmp-port-unreachable"])
        for net in self.allow_nets:
            fwd.append(["-d", net, "-j", "RETURN"])
        for net in self.cluster_nets:
            fwd.append(["-d", net, "-j", "REJECT", "--reject-with", "icmp-port-unreachable"])
        inp.append(["-j", "REJECT", "--reject-with", "icmp-port-unreachable"])
        return {FWD: fwd, IN: inp}


def _ipt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabVMError(f"iptables {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _has(chain: str, rule: list[str]) -> bool:
    return _ipt("-C", chain, *rule, check=False).returncode == 0


def _state_dir() -> Path:
    # One set of chains per network namespace: the nodes sharing it share the chains.
    return Path("/run/labvm/netpolicy") / f"net-{os.stat('/proc/self/ns/net').st_ino}"


STATE_DIR = _state_dir()


def install(policy: Policy, owner: str, state_dir: Path = STATE_DIR) -> None:
    """Install ``owner``'s (a node's) policy, merged with those of other nodes on this
    host that share the chains (several hubs in tests). Idempotent."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = state_dir / f".{owner}.tmp"
    tmp.write_text(json.dumps(asdict(policy), default=sorted))
    os.replace(tmp, state_dir / f"{owner}.json")
    _apply(*_merged(state_dir))


def uninstall(owner: str, state_dir: Path = STATE_DIR) -> None:
    """Drop ``owner``'s part; the chains go with the last one."""
    (state_dir / f"{owner}.json").unlink(missing_ok=True)
    if state_dir.is_dir() and any(state_dir.glob("*.json")):
        _apply(*_merged(state_dir))
    else:
        remove()


def _merged(state_dir: Path) -> tuple[Policy, set[str]]:
    merged, bridges = Policy(bridge=""), set()
    for f in sorted(state_dir.glob("*.json")):
        try:
            p = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        bridges.add(p["bridge"])
        for name in ("hub_api", "dns", "cluster_nets", "allow_nets", "container_nets"):
            for item in p.get(name, []):
                item = tuple(item) if name == "hub_api" else item
                if item not in getattr(merged, name):
                    getattr(merged, name).append(item)
        merged.local_addresses |= set(p.get("local_addresses", []))
    return merged, bridges


def _apply(policy: Policy, bridges: set[str]) -> None:
    """Make both chains hold exactly ``policy.rules()`` (replaced in one atomic
    iptables-restore, so no packet ever sees them half written), hooked in for every
    bridge in ``bridges``."""
    lines = ["*filter"]
    rules = policy.rules()
    lines += [f":{chain} - [0:0]" for chain in rules]  # creates, or empties, the chain
    for chain, chain_rules in rules.items():
        lines += [" ".join(["-A", chain, *map(_restore_arg, rule)]) for rule in chain_rules]
    lines.append("COMMIT")
    proc = subprocess.run(["iptables-restore", "-w", "--noflush"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabVMError(f"installing the container network policy failed: "
                         f"{proc.stderr.strip()}")
    if _ipt("-n", "-L", "DOCKER-USER", check=False).returncode != 0:
        _ipt("-N", "DOCKER-USER")  # dockerd jumps to it from FORWARD once it runs
    for bridge in sorted(bridges):
        for parent, chain in (("DOCKER-USER", FWD), ("INPUT", IN)):
            jump = ["-i", bridge, "-j", chain]
            if not _has(parent, jump):
                _ipt("-I", parent, "1", *jump)


def _restore_arg(arg: str) -> str:
    # iptables-restore splits on spaces and takes double quotes (the log prefix has one).
    return f'"{arg}"' if " " in arg else arg


def remove() -> None:
    """Take the chains and every jump to them away (``labvm-node network-policy remove``)."""
    for parent, chain in (("DOCKER-USER", FWD), ("INPUT", IN)):
        for line in _ipt("-S", parent, check=False).stdout.splitlines():
            parts = line.split()
            if parts[:2] == ["-A", parent] and parts[-2:] == ["-j", chain]:
                _ipt("-D", parent, *parts[2:], check=False)
        if _ipt("-n", "-L", chain, check=False).returncode == 0:
            _ipt("-F", chain)
            _ipt("-X", chain)


def show(bridge: str) -> str:
    """The installed policy as ``iptables -S`` prints it, and whether it is hooked in."""
    out = []
    for parent, chain in (("DOCKER-USER", FWD), ("INPUT", IN)):
        hooked = _has(parent, ["-i", bridge, "-j", chain])
        out.append(f"# {parent} -i {bridge} -j {chain}: {'yes' if hooked else 'MISSING'}")
        listing = _ipt("-S", chain, check=False)
        out.append(listing.stdout.rstrip() if listing.returncode == 0 else f"# no {chain}")
    return "\n".join(out)


def installed(bridge: str) -> bool:
    return all(_has(parent, ["-i", bridge, "-j", chain])
               for parent, chain in (("DOCKER-USER", FWD), ("INPUT", IN)))


# ---- what the node knows ----------------------------------------------------------------

def bridge_of(client: docker.DockerClient, network: str) -> str:
    """The Linux bridge of a Docker network (its fixed name, or Docker's br-<id>)."""
    net = client.networks.get(network)
    name = (net.attrs.get("Options") or {}).get(_DOCKER_BRIDGE_OPTION)
    return name or f"br-{net.id[:12]}"


def interface_networks(exclude: set[str] = frozenset()) -> tuple[list[str], set[str]]:
    """(networks, addresses) of this host's IPv4 interfaces, without loopback and the
    interfaces in ``exclude`` (Docker's bridges)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    nets: list[str] = []
    addresses: set[str] = set()
    for line in out.splitlines():
        parts = line.split()
        dev, cidr = parts[1], parts[3]
        addresses.add(cidr.split("/")[0])
        if dev == "lo" or dev in exclude or dev.startswith(("docker", "br-", "veth")):
            continue
        net = str(ipaddress.ip_interface(cidr).network)
        if net not in nets:
            nets.append(net)
    return nets, addresses


def nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    found = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        if ipaddress.ip_address(parts[1]).version == 4:
                            found.append(parts[1])
                    except ValueError:
                        pass
    except OSError:
        pass
    return found


def endpoint(text: str) -> tuple[str, int]:
    """"HOST:PORT" with an IPv4 host, checked."""
    host, _, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        value = int(port)
        if not 0 < value < 65536:
            raise ValueError
    except ValueError:
        raise LabVMError(f"not an IPv4 HOST:PORT: {text!r}") from None
    return host, value


def network(text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text, strict=False))
    except ValueError:
        raise LabVMError(f"not an IPv4 network: {text!r}") from None


def node_policy(client: docker.DockerClient, network_name: str, hub_api: list[str],
                cluster_nets: list[str], allow_nets: list[str]) -> Policy:
    """The policy for this node's containers from its settings and what it can see."""
    bridge = bridge_of(client, network_name)
    own_nets, addresses = interface_networks({bridge})
    nets = [network(n) for n in cluster_nets]
    return Policy(bridge=bridge, hub_api=[endpoint(e) for e in hub_api], dns=nameservers(),
                  cluster_nets=own_nets + [n for n in nets if n not in own_nets],
                  allow_nets=[network(n) for n in allow_nets], local_addresses=addresses,
                  container_nets=subnets_of(client, network_name))


def subnets_of(client: docker.DockerClient, network: str) -> list[str]:
    """The IPv4 subnets of a Docker network (where its containers get addresses)."""
    ipam = client.networks.get(network).attrs.get("IPAM") or {}
    out = []
    for cfg in ipam.get("Config") or []:
        try:
            out.append(str(ipaddress.IPv4Network(cfg.get("Subnet", ""), strict=False)))
        except ValueError:
            continue  # an IPv6 subnet: LabVM's network has none, and the policy is IPv4
    return out
