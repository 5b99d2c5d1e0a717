"""The layout keeps its promises: the hub side loads no node engine, the storage library
no JupyterHub."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def _loaded(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout))


def test_the_spawner_loads_no_node_engine_and_no_docker() -> None:
    loaded = _loaded("labvm_spawner.spawner")
    assert not {"docker", "labvm_spawner.node.ops", "labvm_spawner.node.nvml",
                "labvm_spawner.node.allocations", "pynvml"} & loaded


def test_the_storage_library_loads_no_jupyterhub() -> None:
    loaded = _loaded("labvm_spawner.storage.sync")
    assert not {m for m in loaded if m.split(".")[0] in ("jupyterhub", "tornado", "docker")}


def test_configs_and_scripts_carry_no_issue_markers() -> None:
    # Tracker numbers mean nothing to a lab reading its config; comments say what, not when.
    root = Path(__file__).resolve().parent.parent
    files = [root / "jupyterhub_config.py", root / "tests" / "hub_config.py",
             *sorted((root / "scripts").glob("*.sh")), *sorted((root / "bench").glob("*.py"))]
    marked = [f"{f.relative_to(root)}:{n}" for f in files
              for n, line in enumerate(f.read_text().splitlines(), 1)
              if re.search(r"\(issue \d+\)|BEGIN labvm|END labvm", line)]
    assert marked == []
