"""``labvm install-service hub|node``: run LabVM as systemd services.

* ``hub``: JupyterHub with the lab's config (``/etc/labvm/jupyterhub_config.py``, a copy of
  the shipped one made if missing, which the lab then edits).
* ``node``: ``labvm-node serve`` with its settings in a config file
  (``/etc/labvm/labvm_node_config.py``; a template listing every setting is made if
  missing), not a long command line.

The units are written, then enabled (``systemctl enable``; offline with ``--root``).
``--uninstall`` disables and removes them; the config files stay.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

SHIPPED_HUB_CONFIG = Path(__file__).resolve().parent.parent / "share" / "jupyterhub_config.py"

HUB_UNIT = """\
[Unit]
Description=LabVM: JupyterHub with a persistent root container per user
Documentation=https://github.com/labvm/labvm-spawner
After=network-online.target docker.service
Wants=network-online.target
Requires=docker.service

[Service]
Type=simple
Environment=LABVM_STATE_DIR={state_dir}
WorkingDirectory={state_dir}/hub
ExecStart={bin}/jupyterhub -f {config}
Restart=on-failure
RestartSec=5
# Users' servers are Docker containers: they outlive a hub restart, which reattaches.
KillMode=mixed

[Install]
WantedBy=multi-user.target
"""

NODE_UNIT = """\
[Unit]
Description=LabVM node agent: this machine's GPUs, uppers and containers for the hub
Documentation=https://github.com/labvm/labvm-spawner
After=network-online.target docker.service
Wants=network-online.target
Requires=docker.service

[Service]
Type=simple
ExecStart={bin}/labvm-node serve --config {config}
Restart=on-failure
RestartSec=5
KillMode=mixed

[Install]
WantedBy=multi-user.target
"""

UNITS = {"hub": "labvm-hub.service", "node": "labvm-node.service"}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=sorted(UNITS), help="what this machine runs")
    parser.add_argument("--config", type=Path, default=None,
                        help="the service's config file (default: /etc/labvm/"
                        "jupyterhub_config.py or /etc/labvm/labvm_node_config.py)")
    parser.add_argument("--state-dir", default="/var/lib/labvm",
                        help="the hub's state directory (default %(default)s)")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="install into this root instead of / (offline enable)")
    parser.add_argument("--no-enable", action="store_true", help="only write the files")
    parser.add_argument("--uninstall", action="store_true",
                        help="disable and remove the unit (config files stay)")
    parser.set_defaults(func=run)


def _in_root(root: Path, path: Path) -> Path:
    return root / path.relative_to("/") if root != Path("/") else path


def _systemctl(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["systemctl"]
    if root != Path("/") or not Path("/run/systemd/system").is_dir():
        cmd.append(f"--root={root}")  # no running systemd here: just the symlinks
    return subprocess.run([*cmd, *args], capture_output=True, text=True)


def run(args: argparse.Namespace) -> int:
    root: Path = args.root
    unit = UNITS[args.role]
    unit_path = _in_root(root, Path("/etc/systemd/system") / unit)
    if args.uninstall:
        if unit_path.exists():
            if not args.no_enable:
                _systemctl(root, "disable", unit)
            unit_path.unlink()
            print(f"removed {unit_path}")
        else:
            print(f"{unit} is not installed")
        return 0
    default = ("/etc/labvm/jupyterhub_config.py" if args.role == "hub"
               else "/etc/labvm/labvm_node_config.py")
    config = args.config or Path(default)
    config_file = _in_root(root, config)
    config_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not config_file.exists():
        _write_config(args.role, config_file)
        print(f"wrote {config_file}: edit it for this {args.role}")
    bin_dir = Path(sys.executable).parent
    text = (HUB_UNIT.format(state_dir=args.state_dir, bin=bin_dir, config=config)
            if args.role == "hub" else NODE_UNIT.format(bin=bin_dir, config=config))
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(text)
    print(f"wrote {unit_path}")
    if args.role == "hub":
        _in_root(root, Path(args.state_dir) / "hub").mkdir(parents=True, exist_ok=True)
    if not args.no_enable:
        r = _systemctl(root, "enable", unit)
        if r.returncode != 0:
            print(f"labvm: systemctl enable {unit} failed: {r.stderr.strip()}",
                  file=sys.stderr)
            return 1
        print(f"enabled {unit} (start it with: systemctl start {unit})")
    return 0


def _write_config(role: str, path: Path) -> None:
    if role == "hub":
        shutil.copyfile(SHIPPED_HUB_CONFIG, path)
    else:
        from .node import NodeAgent

        path.write_text(NodeAgent().generate_config_file())
    os.chmod(path, 0o600)
