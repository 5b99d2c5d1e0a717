"""Node settings are defined once (node/settings.py) and documented once (the README)."""

from __future__ import annotations

import re
from pathlib import Path

from labvm_spawner.cli.node import NodeAgent
from labvm_spawner.node.settings import NodeSettings
from labvm_spawner.spawner import LabVMSpawner

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _documented() -> set[str]:
    section = README[README.index("## Configuration"):README.index("## Layout")]
    return set(re.findall(r"`([a-z_]+)`", "\n".join(
        line.split("|")[1] for line in section.splitlines() if line.startswith("| `"))))


def test_every_setting_is_in_the_readme_table() -> None:
    own = set(LabVMSpawner.class_own_traits(config=True))
    node = {n for n, t in NodeSettings.class_traits().items() if t.metadata.get("config")}
    assert own | node <= _documented(), (own | node) - _documented()


def test_the_spawner_and_the_agent_take_the_same_node_settings() -> None:
    node = {n for n, t in NodeSettings.class_traits().items() if t.metadata.get("config")}
    assert node <= set(LabVMSpawner.class_traits(config=True))
    assert node <= set(NodeAgent.class_traits(config=True))
    # Every node setting has a command-line flag on the agent too (switches in flags).
    switches = {name for conf, _help in NodeAgent.flags.values() for name in conf["NodeAgent"]}
    assert switches == {"gpu_sharing", "housekeeping_repair"}
    assert node - {"node_name"} - switches <= {
        target.split(".", 1)[1] for target in NodeAgent.aliases.values()} | {"node_name"}


def test_agent_flags_build_the_node_config() -> None:
    agent = NodeAgent()
    agent.initialize(["--name", "a", "--state-dir", "/srv/labvm", "--hub-api", "10.0.0.1:8081",
                      "--cluster-net", "10.77.0.0/24", "--cluster-net", "10.1.0.0/16",
                      "--allow-image", "lab/cuda:12", "--sync-interval", "2", "--gpu-sharing"])
    cfg = agent.node_config(hub_api=agent.hub_api)
    assert (cfg.name, cfg.state_dir, cfg.hub_api, cfg.cluster_nets, cfg.allowed_images,
            cfg.sync_interval_s, cfg.gpu_sharing) == (
        "a", "/srv/labvm", ["10.0.0.1:8081"], ["10.77.0.0/24", "10.1.0.0/16"],
        ["lab/cuda:12"], 2.0, True)
