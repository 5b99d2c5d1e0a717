"""Where a server starts: its root's node if it has one, else a node that fits it.

Pure functions over ``cluster.NodeView``s, so every rule is testable without nodes.
"""

from __future__ import annotations

from .cluster import NodeView
from .errors import LabVMError
from .node.protocol import Limits
from .node.protocol import are_free as _are_free
from .node.protocol import gpus_phrase as _gpus


class Unplaceable(LabVMError):
    """No node can take the server now (try again later, or ask for less)."""

    status = 503


def fits(node: NodeView, key: str, gpus: int, model: str | None, limits: Limits,
         sharing: bool = False) -> str | None:
    """Why ``node`` cannot take this server, or None if it can."""
    if not node.up:
        return f"node {node.name} is down"
    info = node.info
    free = info.usable_gpus(model, key, sharing)
    if free < gpus:
        what = f"{_gpus(gpus)} of model {model!r}" if model else _gpus(gpus)
        return f"{what} requested but {_are_free(free)} on node {node.name}"
    # Memory limits are a hard line (the OOM killer); CPU limits are shares of time a
    # lab happily overcommits, so CPU only ranks the nodes (choose_node).
    running = key in info.servers
    if not running and info.mem_free < limits.mem_bytes:
        return (f"node {node.name} has {info.mem_free >> 20} MiB to spare, "
                f"{limits.mem_bytes >> 20} asked")
    return None


def choose_node(nodes: dict[str, NodeView], key: str, gpus: int, model: str | None,
                limits: Limits, sharing: bool = False, placed: str | None = None,
                pinned: str | None = None) -> str:
    """The node for this start; LabVMError says why none can take it."""
    if placed is not None:
        # A root stays where its upper is; only a migration moves it.
        node = nodes.get(placed)
        if node is None or not node.up:
            raise LabVMError(
                f"Your server's data is on node {placed}, which is down. An admin can move "
                f"it to another node (labvm migrate), from its last sync."
            )
        why = fits(node, key, gpus, model, limits, sharing)
        if why:
            raise LabVMError(f"Your server lives on node {placed}, which cannot start it "
                             f"now: {why}. Ask for fewer GPUs, or ask an admin to move you.")
        return placed
    if pinned is not None:
        node = nodes.get(pinned)
        if node is None:
            raise LabVMError(f"You are pinned to node {pinned}, which is not registered.")
        why = fits(node, key, gpus, model, limits, sharing)
        if why:
            raise LabVMError(f"You are pinned to node {pinned}, which cannot start your "
                             f"server now: {why}.")
        return pinned
    reasons = []
    candidates = []
    for node in nodes.values():
        if node.drained:
            reasons.append(f"node {node.name} is drained")
            continue
        why = fits(node, key, gpus, model, limits, sharing)
        if why:
            reasons.append(why)
            continue
        info = node.info
        # Pack: fewest GPUs left free by this choice (CPU-only users stay off GPU
        # nodes), then the most CPU to spare.
        spare = len(info.free_gpus(model, key)) - gpus
        load = (info.cpus_committed + limits.cpus) / max(info.cpus, 1)
        candidates.append((spare, load, node.name))
    if not candidates:
        detail = "; ".join(sorted(reasons)) or "no node is registered"
        raise Unplaceable(f"No node can start this server now: {detail}.")
    return min(candidates)[2]
