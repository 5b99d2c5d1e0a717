"""``labvm install-service``: systemd units that systemd accepts, config files the
commands really load, and a clean uninstall. In a scratch root (this machine runs no
systemd), units checked with ``systemd-analyze verify``."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from support.components import require

from labvm_spawner import cli
from labvm_spawner.cli.node import NodeAgent


@pytest.fixture
def root(tmp_path: Path) -> Path:
    require(shutil.which("systemd-analyze") is not None and shutil.which("systemctl")
            is not None, "systemd-analyze and systemctl (package systemd)")
    return tmp_path / "root"


@pytest.mark.parametrize("role,unit,config", [
    ("hub", "labvm-hub.service", "jupyterhub_config.py"),
    ("node", "labvm-node.service", "labvm_node_config.py"),
])
def test_units_install_verify_and_uninstall(root: Path, role: str, unit: str,
                                            config: str) -> None:
    assert cli.main(["install-service", role, "--root", str(root)]) == 0
    unit_file = root / "etc/systemd/system" / unit
    verify = subprocess.run(["systemd-analyze", "verify", str(unit_file)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert (root / "etc/systemd/system/multi-user.target.wants" / unit).is_symlink()
    cfg = root / "etc/labvm" / config
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert f"-f /etc/labvm/{config}" in unit_file.read_text() or \
        f"--config /etc/labvm/{config}" in unit_file.read_text()
    # A second install keeps the lab's edits to the config file.
    cfg.write_text(cfg.read_text() + "\n# edited by the lab\n")
    assert cli.main(["install-service", role, "--root", str(root)]) == 0
    assert cfg.read_text().endswith("# edited by the lab\n")
    assert cli.main(["install-service", role, "--root", str(root), "--uninstall"]) == 0
    assert not unit_file.exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants" / unit).exists()
    assert cfg.exists()


def test_the_node_config_file_is_what_serve_runs_with(root: Path) -> None:
    assert cli.main(["install-service", "node", "--root", str(root), "--no-enable"]) == 0
    cfg = root / "etc/labvm/labvm_node_config.py"
    text = cfg.read_text()
    assert "c.NodeAgent.state_dir" in text and "c.NodeAgent.hub_api" in text  # every setting
    cfg.write_text(text + '\nc.NodeAgent.node_name = "gpu3"\n'
                   'c.NodeAgent.url = "https://10.0.0.13:8741"\n'
                   'c.NodeAgent.hub_api = ["10.0.0.1:8081"]\n'
                   'c.NodeAgent.cluster_networks = ["10.77.0.0/24"]\n'
                   'c.NodeAgent.state_dir = "/srv/labvm"\n')
    agent = NodeAgent()
    agent.initialize(["--config", str(cfg)])
    node = agent.node_config(hub_api=agent.hub_api)
    assert (node.name, node.state_dir, node.hub_api, node.cluster_nets) == (
        "gpu3", "/srv/labvm", ["10.0.0.1:8081"], ["10.77.0.0/24"])
    assert agent.url == "https://10.0.0.13:8741"
    # What is still missing is named, as `labvm-node serve` would say it.
    with pytest.raises(Exception, match="missing --token-hash-file, --registry-dir"):
        agent.start()
