"""A node's settings, defined once.

``NodeSettings`` is a traitlets mix-in: ``LabVMSpawner`` takes it for its in-process
node (``c.LabVMSpawner.state_dir``) and ``labvm-node serve`` for an agent
(``--state-dir``, or ``c.NodeAgent.state_dir``). Both turn it into the same
``NodeConfig`` with ``node_config()``. The README's configuration table lists them
(a test checks that it lists every one).
"""

from __future__ import annotations

from traitlets import (
    Bool,
    CaselessStrEnum,
    Float,
    HasTraits,
    Int,
    List,
    TraitError,
    Unicode,
    validate,
)

from ..names import is_node_name
from ..storage.mounts import CACHED_MOUNT_OPTIONS
from .protocol import CAPABILITIES, NodeConfig


class NodeSettings(HasTraits):
    """Everything a node needs to know to run servers."""

    node_name = Unicode(
        "local",
        help="Name of this node in LabVM's records and container names (lower-case letters, "
        "digits, '-', '_' and '.').",
    ).tag(config=True)

    @validate("node_name")
    def _valid_node_name(self, proposal):  # type: ignore[no-untyped-def]
        if not is_node_name(proposal["value"]):
            raise TraitError(f"node_name {proposal['value']!r} is not a valid LabVM node name")
        return proposal["value"]

    docker_url = Unicode(
        "",
        help="Docker engine URL (e.g. unix:///var/run/docker.sock); empty uses DOCKER_HOST "
        "or the default socket. The socket is never passed into a container.",
    ).tag(config=True)

    state_dir = Unicode(
        "/var/lib/labvm",
        help="Node-local directory for uppers, mount points and the unpacked image layer. "
        "It must be on a local filesystem that supports overlayfs upper directories.",
    ).tag(config=True)

    store_root = Unicode(
        "",
        help="Root of the layer store (a local directory, or a MooseFS mount for several "
        "nodes). Empty means <state_dir>/store.",
    ).tag(config=True)

    cached_store_root = Unicode(
        "",
        help="The layer store's root as seen through a second, read-only MooseFS mount with "
        f"long cache timeouts (mfsmount -o {CACHED_MOUNT_OPTIONS}). Roots read their layer "
        "versions through it: versions never change once published, and with the store mount's "
        "caches off each file a container opens costs MooseFS lookups. Empty: through "
        "store_root.",
    ).tag(config=True)

    image_layer_dir = Unicode(
        "",
        help="Where image root filesystems are unpacked as shared overlay layers. Empty "
        "means <state_dir>/rootfs.",
    ).tag(config=True)

    db_url = Unicode(
        "",
        help="SQLAlchemy URL of LabVM's database (GPU allocations, and on the hub placements "
        "and enrolled nodes). Empty means sqlite:///<state_dir>/labvm.sqlite.",
    ).tag(config=True)

    network_name = Unicode(
        "labvm",
        help="Docker bridge network for user containers (created if missing, with "
        "inter-container traffic off).",
    ).tag(config=True)

    dev_root = Unicode(
        "/dev",
        help="Directory holding the host's /dev/nvidiaN and control device nodes.",
    ).tag(config=True)

    nvidia_runtime = CaselessStrEnum(
        ["auto", "on", "off"],
        "auto",
        help="Pass GPUs to Docker as a DeviceRequest by UUID: 'auto' does so when the "
        "engine has the NVIDIA runtime. Device nodes are passed either way.",
    ).tag(config=True)

    gpu_sharing = Bool(
        False,
        help="Allow several users on one GPU. Off: every GPU is held by one server at most.",
    ).tag(config=True)

    userns_remap_user = Unicode(
        "dockremap",
        help="The user whose /etc/subuid range dockerd's userns-remap uses; its first id "
        "is the host uid of every container's root.",
    ).tag(config=True)

    container_uid = Int(1000, help="uid of the user's own account inside the container.").tag(
        config=True)

    stop_timeout = Float(
        10, help="Seconds a container gets to stop before it is killed."
    ).tag(config=True)

    capabilities = List(
        list(CAPABILITIES),
        help="Linux capabilities of the container's root (all others are dropped).",
    ).tag(config=True)

    secrets_root = Unicode(
        "/run/labvm/secrets",
        help="tmpfs where each server's tokens are handed to its container, so that no "
        "token is written to disk in the container's stored configuration.",
    ).tag(config=True)

    sync_interval = Float(
        10.0,
        help="Seconds between background syncs of each running server's upper to the layer "
        "store. A node's loss loses at most this window.",
    ).tag(config=True)

    lease_grace = Float(
        600.0,
        help="Seconds a node's lease on the layer versions its running roots use outlives "
        "the node's last renewal (every sync_interval). Prune, fsck and restore leave a "
        "leased version alone; a dead node's leases expire after this.",
    ).tag(config=True)

    aside_max_age_days = Float(
        30.0,
        help="Days after which a set-aside upper (the unsynced changes a take-over found "
        "on this node) that no admin restored or deleted is removed; each removal is "
        "logged.",
    ).tag(config=True)

    housekeeping_interval = Float(
        6.0,
        help="Hours between this node's housekeeping rounds: image prune of trees no root "
        "uses, storage fsck of the roots it owns, and pruning of their versions past keep "
        "that no lease holds. The admin Nodes page shows the last round.",
    ).tag(config=True)
    housekeeping_repair = Bool(
        False, help="Let the scheduled fsck repair what it finds (off: it only reports).",
    ).tag(config=True)

    concurrent_starts = Int(
        0,
        help="How many containers this node boots at once; the other starts get their GPUs, "
        "mounts and container meanwhile, then wait their turn (their spawn page says so). "
        "Booting Jupyter is CPU-bound, so more at once only makes each slower. 0 means one "
        "per CPU.",
    ).tag(config=True)

    @validate("sync_interval")
    def _valid_sync_interval(self, proposal):  # type: ignore[no-untyped-def]
        if proposal["value"] <= 0:
            raise TraitError("sync_interval must be positive")
        return proposal["value"]

    cluster_networks = List(
        Unicode(),
        help="IPv4 networks (CIDR) of the cluster's own services that containers must never "
        "reach, besides the networks of this node's interfaces (for example the storage "
        "network). Containers reach only the hub's API there.",
    ).tag(config=True)

    container_allow_networks = List(
        Unicode(),
        help="IPv4 networks (CIDR) inside the cluster's networks that containers may reach "
        "anyway, such as a lab's package mirror.",
    ).tag(config=True)

    allowed_images = List(
        Unicode(),
        help="Images this node runs besides those `labvm image build` made (labvm/user:*); "
        "a start request for any other image is refused.",
    ).tag(config=True)

    publish_ip = Unicode(
        "",
        help="Address Jupyter ports are published on (a node the hub reaches over the "
        "network); empty: the hub reaches containers on the node's own bridge.",
    ).tag(config=True)

    def node_config(self, hub_api: list[str]) -> NodeConfig:
        """These settings as the node engine takes them; ``hub_api``: HOST:PORT of the hub's
        API as containers reach it."""
        return NodeConfig(
            name=self.node_name, docker_url=self.docker_url, state_dir=self.state_dir,
            store_root=self.store_root, cached_store_root=self.cached_store_root,
            image_layer_dir=self.image_layer_dir,
            db_url=self.db_url, network_name=self.network_name, dev_root=self.dev_root,
            nvidia_runtime=self.nvidia_runtime, gpu_sharing=self.gpu_sharing,
            userns_remap_user=self.userns_remap_user, container_uid=self.container_uid,
            stop_timeout=self.stop_timeout, capabilities=list(self.capabilities),
            secrets_root=self.secrets_root, publish_ip=self.publish_ip,
            sync_interval_s=self.sync_interval, lease_grace_s=self.lease_grace,
            aside_max_age_days=self.aside_max_age_days,
            housekeeping_interval_h=self.housekeeping_interval,
            housekeeping_repair=self.housekeeping_repair,
            concurrent_starts=self.concurrent_starts,
            allowed_images=list(self.allowed_images),
            hub_api=list(hub_api), cluster_nets=list(self.cluster_networks),
            allow_nets=list(self.container_allow_networks),
        )
