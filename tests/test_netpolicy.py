"""The container network policy: its rules as literal values, and installing and removing
them for real in iptables, inside a network namespace of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from support.components import require

from labvm_spawner.node.netpolicy import FWD, IN, Policy

POLICY = Policy(bridge="br-test0", hub_api=[("10.78.0.1", 8081), ("172.18.0.1", 8082)],
                dns=["10.255.255.53"], cluster_nets=["10.78.0.0/24", "10.77.0.0/24"],
                allow_nets=["10.78.0.200/32"], local_addresses={"172.18.0.1", "10.78.0.11"},
                container_nets=["172.18.0.0/16"])


def test_rules_as_literal_values() -> None:
    assert POLICY.rules() == {
        FWD: [
            ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
            ["-d", "10.255.255.53/32", "-p", "udp", "-m", "udp", "--dport", "53", "-j",
             "RETURN"],
            ["-d", "10.255.255.53/32", "-p", "tcp", "-m", "tcp", "--dport", "53", "-j",
             "RETURN"],
            ["-d", "10.78.0.1/32", "-p", "tcp", "-m", "tcp", "--dport", "8081", "-j", "RETURN"],
            # other containers: logged (new connections, rate-limited), then refused
            ["-d", "172.18.0.0/16", "-m", "conntrack", "--ctstate", "NEW", "-m", "limit",
             "--limit", "10/min", "--limit-burst", "20", "-j", "LOG", "--log-prefix",
             "labvm refused: "],
            ["-d", "172.18.0.0/16", "-j", "REJECT", "--reject-with", "icmp-port-unreachable"],
            ["-d", "10.78.0.200/32", "-j", "RETURN"],
            ["-d", "10.78.0.0/24", "-j", "REJECT", "--reject-with", "icmp-port-unreachable"],
            ["-d", "10.77.0.0/24", "-j", "REJECT", "--reject-with", "icmp-port-unreachable"],
        ],
        IN: [
            ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            # the hub's API on this very node (the one-node default)
            ["-d", "172.18.0.1/32", "-p", "tcp", "-m", "tcp", "--dport", "8082", "-j",
             "ACCEPT"],
            ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"],
        ],
    }


_IN_NETNS = """
import json, subprocess, sys
from pathlib import Path
from labvm_spawner.node import netpolicy
from labvm_spawner.node.netpolicy import Policy
p = Policy(**json.loads(sys.argv[1]))
state = Path(sys.argv[2])
def listing():
    out = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True,
                         text=True).stdout
    return "\\n".join(line for line in out.splitlines() if not line.startswith("#"))
netpolicy.install(p, "n1", state)
netpolicy.install(p, "n1", state)  # again: nothing doubles
first = listing()
other = Policy(**dict(json.loads(sys.argv[1]), hub_api=[["10.78.0.1", 9000]]))
netpolicy.install(other, "n2", state)  # a second node sharing the chains
both = listing()
ok = netpolicy.installed(p.bridge)
netpolicy.uninstall("n2", state)
back = listing()
netpolicy.uninstall("n1", state)
print(json.dumps({"first": first, "both": both, "back": back, "gone": listing(),
                  "installed": ok}))
"""


@pytest.mark.needs_root
def test_install_is_idempotent_merges_nodes_and_removes_cleanly(tmp_path: Path) -> None:
    import json

    require(os.geteuid() == 0, "root for iptables in a network namespace")
    ns = f"labvm-t{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        policy = {k: sorted(v) if isinstance(v, set) else v
                  for k, v in POLICY.__dict__.items()}
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _IN_NETNS,
                            json.dumps(policy), str(tmp_path / "state")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    first = out["first"].splitlines()
    assert first.count("-A DOCKER-USER -i br-test0 -j LABVM-FWD") == 1
    assert first.count("-A INPUT -i br-test0 -j LABVM-IN") == 1
    assert "-A LABVM-FWD -d 10.77.0.0/24 -j REJECT --reject-with icmp-port-unreachable" in first
    assert "-A LABVM-IN -j REJECT --reject-with icmp-port-unreachable" in first
    assert '-A LABVM-FWD -d 172.18.0.0/16 -j REJECT --reject-with icmp-port-unreachable' in first
    assert any(line.startswith("-A LABVM-FWD -d 172.18.0.0/16") and '--log-prefix "labvm refused: "'
               in line for line in first), first
    assert sum(line.startswith("-A LABVM-FWD") for line in first) == 9
    assert out["installed"]
    assert "-A LABVM-FWD -d 10.78.0.1/32 -p tcp -m tcp --dport 9000 -j RETURN" in out["both"]
    assert out["back"] == out["first"]
    assert "LABVM" not in out["gone"]


@pytest.mark.parametrize("bad", ["10.0.0.1", "host:80", "10.0.0.1:99999"])
def test_bad_endpoints_are_refused(bad: str) -> None:
    from labvm_spawner.errors import LabVMError
    from labvm_spawner.node.netpolicy import endpoint

    with pytest.raises(LabVMError, match="HOST:PORT"):
        endpoint(bad)
