"""Hub config for bench/spawn.py: the test hub, with the spawner chosen by BENCH_SPAWNER."""

import os
from pathlib import Path

load_subconfig(str(Path(__file__).resolve().parent.parent / "tests" / "hub_config.py"))  # noqa: F821

c = get_config()  # noqa: F821
c.Spawner.pre_spawn_hook = None
if os.environ["BENCH_SPAWNER"] == "docker":
    # DockerSpawner from PyPI, on the same image and engine, and a bridge network made
    # the same way: LabVM's own network carries LabVM's container policy, which lets
    # containers reach only the LabVM hub's API.
    import docker

    from labvm_spawner.node.network import ensure_network

    ensure_network(docker.from_env(), "labvm-bench-docker")
    c.JupyterHub.spawner_class = "dockerspawner.DockerSpawner"
    c.DockerSpawner.image = os.environ["LABVM_TEST_IMAGE"]
    c.DockerSpawner.network_name = "labvm-bench-docker"
    c.DockerSpawner.use_internal_ip = True
    c.DockerSpawner.remove = False  # a warm start restarts the stopped container
    c.DockerSpawner.cmd = ["jupyterhub-singleuser", "--allow-root"]
    c.DockerSpawner.prefix = f"bench-{os.environ['LABVM_TEST_NODE']}"
    c.DockerSpawner.extra_create_kwargs = {"labels": {"labvm.node": os.environ["LABVM_TEST_NODE"]}}

# Ten Jupyter servers starting at once on a small machine take longer than the test hubs'
# 30 s: the benchmarks measure how long, not whether a timeout cut them short.
c.Spawner.http_timeout = 180
c.Spawner.start_timeout = 300
# LabVM nodes start this many servers at once (0: the default, one per CPU).
c.LabVMSpawner.concurrent_starts = int(os.environ.get("BENCH_CONCURRENT_STARTS", "0"))
