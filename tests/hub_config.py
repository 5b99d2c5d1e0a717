"""JupyterHub config for the end-to-end tests: the repo's own config, test knobs on top.

Everything test-specific comes from the environment the harness sets
(``tests/support/hubharness.py``). NVML is faked at the pynvml call boundary only.
"""

import os
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))

# The repo's own configuration first, exactly as an admin would run it.
load_subconfig(str(here.parent / "jupyterhub_config.py"))  # noqa: F821

from support import fake_nvml  # noqa: E402

fake_nvml.install(os.environ.get("LABVM_FAKE_NVML") or None)

c = get_config()  # noqa: F821
c.JupyterHub.port = int(os.environ["LABVM_TEST_PORT"])
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(os.environ['LABVM_TEST_PORT']) + 1}"
c.JupyterHub.hub_port = int(os.environ["LABVM_TEST_PORT"]) + 2
c.JupyterHub.db_url = f"sqlite:///{os.environ['LABVM_TEST_HUB_DIR']}/jupyterhub.sqlite"
c.JupyterHub.pid_file = f"{os.environ['LABVM_TEST_HUB_DIR']}/jupyterhub.pid"
c.ConfigurableHTTPProxy.pid_file = f"{os.environ['LABVM_TEST_HUB_DIR']}/proxy.pid"
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = os.environ["LABVM_TEST_PASSWORD"]
c.Authenticator.allow_all = True
c.JupyterHub.allow_named_servers = True
c.JupyterHub.services = [{"name": "labvm-test", "api_token": os.environ["LABVM_TEST_API_TOKEN"]}]
c.JupyterHub.load_roles = [{
    "name": "labvm-test", "services": ["labvm-test"],
    "scopes": ["admin:users", "admin:groups", "admin:servers", "access:servers", "read:users",
               "tokens", "admin-ui"],
}]
c.LabVMSpawner.state_dir = os.environ["LABVM_TEST_STATE"]
c.LabVMSpawner.dev_root = os.environ["LABVM_TEST_DEV"]
c.LabVMSpawner.policy = {"cpus": 1, "mem": "1G", "pids": 1024, "max_gpus": 8,
                         "io_write_bps": "200M"}
c.LabVMSpawner.group_policy = {"big": {"cpus": 2, "mem": "2G"}}
# Test hubs' uppers are on the node's disk, without quotas, unless a test gives them a
# btrfs (hub_factory(upperfs=...)) and a policy with "disk".
c.LabVMSpawner.admin_policy = {k: v for k, v in c.LabVMSpawner.admin_policy.items()
                               if k != "disk"}
if os.environ.get("LABVM_TEST_USER_POLICY"):
    import json

    c.LabVMSpawner.user_policy = json.loads(os.environ["LABVM_TEST_USER_POLICY"])
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 30
c.LabVMSpawner.image = os.environ["LABVM_TEST_IMAGE"]
c.LabVMSpawner.image_layer_dir = os.environ["LABVM_TEST_ROOTFS"]
c.LabVMSpawner.node_name = os.environ["LABVM_TEST_NODE"]
c.LabVMSpawner.secrets_root = os.environ["LABVM_TEST_STATE"] + "/secrets"


def _break_one_user(spawner):
    # Lets a test make one user's server exit at start, after GPUs and root are set up.
    if spawner.user.name == os.environ.get("LABVM_TEST_BROKEN_USER"):
        if os.environ.get("LABVM_TEST_BREAKAGE") == "image":
            spawner.image = "labvm/no-such-image:latest"
        else:
            spawner.cmd = ["/bin/false"]


c.Spawner.pre_spawn_hook = _break_one_user
# POST .../server answers at once (202), so tests can watch the progress events.
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}

if os.environ.get("LABVM_TEST_RESTART_INTERRUPTED") == "1":
    c.LabVMSpawner.restart_interrupted = True
    c.Spawner.poll_interval = 5  # find a node's going down soon

# ---- multi-node test bed (tests/support/testbed.py): no node in the hub, nodes a and b ----
if os.environ.get("LABVM_TEST_TESTBED") == "1":
    c.LabVMSpawner.local_node = False
    c.LabVMSpawner.registry_dir = os.environ["LABVM_TEST_REGISTRY"]
    c.LabVMSpawner.node_key_file = os.environ["LABVM_TEST_NODE_KEY"]
    # Containers on the nodes reach the hub's API on the test bed's bridge, and the
    # nodes reach its public URL there (to enroll).
    c.JupyterHub.hub_ip = os.environ["LABVM_TEST_HUB_IP"]
    # Plain HTTP on the test bed's own bridge, which only this machine reaches.
    c.JupyterHub.bind_url = (f"http://{os.environ['LABVM_TEST_HUB_IP']}:"
                             f"{os.environ['LABVM_TEST_PORT']}")
    c.Spawner.http_timeout = 60

# ---- the monitor service: only for hubs started with LABVM_TEST_MONITOR=1 ----
if os.environ.get("LABVM_TEST_MONITOR") == "1":
    from labvm_spawner.monitor.service import hub_service

    # The service runs in its own process, so fake NVML is installed there too. Its GPU
    # processes come from a JSON file the test writes ({"<gpu index>": [[pid, bytes]]}),
    # so real container PIDs can be put on fake GPUs.
    _monitor_shim = f"""
import os, sys
sys.path.insert(0, {str(here)!r})
from support import fake_nvml
fake_nvml.install_with_process_file(os.environ["LABVM_TEST_MONITOR_PROCS"])
from labvm_spawner.monitor.service import main
main(sys.argv[1:])
"""
    _idle_s = float(os.environ.get("LABVM_TEST_MONITOR_IDLE_S", "0"))
    _service, _roles = hub_service(
        port=int(os.environ["LABVM_TEST_PORT"]) + 3,
        command=[sys.executable, "-c", _monitor_shim],
        args=[
            f"--Collector.node_name={os.environ['LABVM_TEST_NODE']}",
            f"--Collector.state_dir={os.environ['LABVM_TEST_STATE']}",
            "--MonitorService.interval_s=1",
            "--MonitorService.history_step_s=5",
            "--Collector.container_refresh_s=1",
            f"--IdleReclaim.idle_hours={_idle_s / 3600}",
            f"--IdleReclaim.warn_hours={_idle_s / 2 / 3600}",
            "--IdleReclaim.idle_util_percent=101",  # fake GPUs never idle by themselves
        ] + ([
            f"--MonitorService.registry_dir={os.environ['LABVM_TEST_REGISTRY']}",
            f"--MonitorService.node_key_file={os.environ['LABVM_TEST_NODE_KEY']}",
            f"--Collector.store_root={os.environ['LABVM_TEST_STORE']}",
        ] if os.environ.get("LABVM_TEST_TESTBED") == "1" else []),
    )
    _service["environment"] = {
        "LABVM_TEST_MONITOR_PROCS": os.environ["LABVM_TEST_MONITOR_PROCS"],
        "LABVM_METRICS_TOKEN": os.environ["LABVM_TEST_METRICS_TOKEN"],
        "LABVM_NODE_DOWN_AFTER_S": os.environ.get("LABVM_NODE_DOWN_AFTER_S", "15"),
    }
    c.Authenticator.admin_users = {"boss"}  # the admin the monitor tests log in as
    c.LabVMSpawner.housekeeping_interval = 0.01  # a round every 36 s: the pages show one
    c.JupyterHub.services = c.JupyterHub.services + [_service]
    c.JupyterHub.load_roles = c.JupyterHub.load_roles + _roles

# ---- the SSH gateway: only for hubs started with LABVM_TEST_SSH=1 ----
if os.environ.get("LABVM_TEST_SSH") == "1":
    from labvm_spawner.ssh.service import hub_service as ssh_service

    _testbed = os.environ.get("LABVM_TEST_TESTBED") == "1"
    _ssh, _ssh_roles = ssh_service(args=[
        f"--SSHService.state_dir={os.environ['LABVM_TEST_STATE']}",
        f"--SSHService.local_node={'' if _testbed else os.environ['LABVM_TEST_NODE']}",
        "--SSHService.ip=127.0.0.1",
        f"--SSHService.port={os.environ['LABVM_TEST_SSH_PORT']}",
        "--SSHService.public_host=127.0.0.1",
        f"--SSHService.public_hub_url=http://127.0.0.1:{os.environ['LABVM_TEST_PORT']}/hub/",
        f"--SSHService.max_failures_per_source={os.environ.get('LABVM_TEST_SSH_MAX_FAILS', '10')}",
        "--SSHService.token_passwords=" + os.environ.get("LABVM_TEST_SSH_TOKENS", "False"),
        "--SSHService.start_on_connect=" + os.environ.get("LABVM_TEST_SSH_AUTOSTART", "False"),
    ] + ([
        f"--SSHService.registry_dir={os.environ['LABVM_TEST_REGISTRY']}",
        f"--SSHService.node_key_file={os.environ['LABVM_TEST_NODE_KEY']}",
    ] if os.environ.get("LABVM_TEST_TESTBED") == "1" else []))
    c.JupyterHub.services = c.JupyterHub.services + [_ssh]
    c.JupyterHub.load_roles = c.JupyterHub.load_roles + _ssh_roles

if os.environ.get("LABVM_TEST_SYNC_INTERVAL"):
    c.LabVMSpawner.sync_interval = float(os.environ["LABVM_TEST_SYNC_INTERVAL"])
