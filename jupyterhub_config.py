"""JupyterHub configuration for LabVM on one node (the embedded default).

This machine is the only node and a local directory is the layer store. Run it
with ``scripts/start-hub.sh``, which installs and starts what is missing first.
"""

import os

import docker

from labvm_spawner.node.network import ensure_network

c = get_config()  # noqa: F821
state = os.environ.get("LABVM_STATE_DIR", "/var/lib/labvm")
os.makedirs(f"{state}/hub", exist_ok=True)

c.JupyterHub.spawner_class = "labvm"
c.JupyterHub.bind_url = "http://127.0.0.1:8000"
# The hub's API listens on the containers' bridge gateway, the one address both
# the proxy (on this host) and the containers can reach.
c.JupyterHub.hub_ip = ensure_network(docker.from_env(), "labvm")
c.JupyterHub.hub_port = 8081
# Servers are containers that outlive the hub: a restarted hub reattaches to them.
c.JupyterHub.cleanup_servers = False
c.JupyterHub.db_url = f"sqlite:///{state}/hub/jupyterhub.sqlite"
c.JupyterHub.pid_file = f"{state}/hub/jupyterhub.pid"
# Sessions survive a hub restart: JupyterHub makes the cookie secret once, in a root-only
# file (0600) next to its database, and refuses it if others can read it.
c.JupyterHub.cookie_secret_file = f"{state}/hub/jupyterhub_cookie_secret"

# Accounts are the node's own (PAM): passwords stay hashed in /etc/shadow. Members
# of the group labvm-users may log in; labvm-admin (made by start-hub.sh) is the admin.
c.JupyterHub.authenticator_class = "pam"
c.Authenticator.admin_users = {"labvm-admin"}
c.PAMAuthenticator.allowed_groups = {"labvm-users"}
c.PAMAuthenticator.admin_groups = {"labvm-admins"}

c.LabVMSpawner.state_dir = state
# More nodes (README, "Several nodes and migration"): run `labvm-node serve` on each, keep
# the store on MooseFS, and set here
#   c.LabVMSpawner.local_node = False
#   c.LabVMSpawner.registry_dir = "/mnt/mfs/labvm/registry"
#   c.LabVMSpawner.node_key_file = "/etc/labvm/node.key"
#   c.JupyterHub.hub_ip = "<an address the nodes' containers reach>"
# and pass --MonitorService.registry_dir/--MonitorService.node_key_file to the service below.
# "disk" is a quota on each server's writable layer: scripts/setup.sh puts the uppers on a
# btrfs with quotas (scripts/upperfs.sh); a node without one refuses servers with a quota.
c.LabVMSpawner.policy = {"cpus": 2, "mem": "4G", "pids": 2048, "max_gpus": 1, "disk": "20G"}
c.LabVMSpawner.admin_policy = {"max_gpus": 8, "cpus": 8, "mem": "32G", "disk": "100G"}
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 120

# ---- the monitor service ----
# One hub-managed service: admin pages (nodes, GPUs, users, actions), each user's own
# usage page, and /metrics. It appears in the hub's Services menu. /metrics is read by a
# logged-in admin or with "Authorization: Bearer $LABVM_METRICS_TOKEN"; never anonymously.
# Idle GPU reclaim is off until an admin sets e.g. "--IdleReclaim.idle_hours=12".
from labvm_spawner.monitor.service import hub_service  # noqa: E402

_monitor, _monitor_roles = hub_service(port=8089, args=[
    f"--Collector.state_dir={state}",
    "--Collector.node_name=local",
])
_monitor["environment"] = {"LABVM_METRICS_TOKEN": os.environ.get("LABVM_METRICS_TOKEN", "")}
c.JupyterHub.services.append(_monitor)
c.JupyterHub.load_roles.extend(_monitor_roles)

# ---- the SSH gateway ----
# The SSH gateway on port 2222: users reach the sshd in their own containers with the keys
# they add on their LabVM page (README, "SSH"), never with passwords. Set
# --SSHService.public_host to the name users reach this machine by.
from labvm_spawner.ssh.service import hub_service as ssh_service  # noqa: E402

_ssh, _ssh_roles = ssh_service(args=[
    f"--SSHService.state_dir={state}",
    "--SSHService.local_node=local",
    "--SSHService.port=2222",
])
c.JupyterHub.services.append(_ssh)
c.JupyterHub.load_roles.extend(_ssh_roles)


# Last: never serve log-ins in clear on a non-loopback address (README, "HTTPS").
from labvm_spawner.hubconfig import require_tls  # noqa: E402

require_tls(c)
