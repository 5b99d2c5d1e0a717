"""Housekeeping a node does on a schedule, so that no admin has to remember it:

* ``image prune``: unpacked image trees of images the engine no longer has, that no
  mounted root uses;
* ``storage fsck`` of the roots this node owns: a report, repairs only when so set;
* pruning of their versions past ``keep`` that no lease holds (``storage/leases.py``).

Each root is looked after by the node that owns it, so two nodes never work on one root
at once. The last run's findings go to ``<state_dir>/housekeeping.json`` (read by the
admin service on the hub's own node) and into the node's heartbeat (every other node).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..storage.store import LayerStore
from .rootfs import prune_rootfs

log = logging.getLogger("labvm.node")
RESULT_FILE = "housekeeping.json"


def run(store: LayerStore, node: str, rootfs_dir: Path, keep_image_ids: set[str] | None,
        repair: bool = False) -> dict[str, Any]:
    """One round; every step reports what it did or why it failed, none stops the rest.
    ``keep_image_ids``: the images whose trees stay (None: the image list is unknown, and
    no tree is pruned)."""
    result: dict[str, Any] = {"t": time.time(), "node": node}
    try:
        if keep_image_ids is None:
            raise RuntimeError("the engine's images are unknown: nothing pruned")
        removed = prune_rootfs(rootfs_dir, keep_image_ids, min_age_s=3600)
        result["image_prune"] = {"removed": [p.name for p in removed]}
    except Exception as e:  # a report, never a crash of the node
        log.exception("housekeeping: image prune")
        result["image_prune"] = {"error": str(e)}
    mine = []
    for key in store.keys():
        owner = store.owner(key)
        if owner is not None and owner[0] == node:
            mine.append(key)
    try:
        report = store.fsck(repair=repair, keys=mine)
        result["fsck"] = {"keys": len(mine), "problems": report.problems,
                          "repaired": report.repaired, "repair": repair}
    except Exception as e:
        log.exception("housekeeping: fsck")
        result["fsck"] = {"error": str(e)}
    pruned: dict[str, list[int]] = {}
    kept: dict[str, dict[str, list[str]]] = {}
    errors = []
    for key in mine:
        try:
            gone = store.prune(key)
        except Exception as e:
            errors.append(f"{key}: {e}")
            continue
        if gone:
            pruned[key] = gone
        if store.skipped.get(key):
            kept[key] = {str(n): holders for n, holders in store.skipped[key].items()}
    result["prune"] = {"pruned": pruned, "kept_for_leases": kept, "errors": errors}
    log.info("housekeeping: %d image tree(s) removed, %d problem(s), %d version(s) pruned",
             len(result["image_prune"].get("removed", [])),
             len(result["fsck"].get("problems", [])), sum(map(len, pruned.values())))
    return result


def save(state_dir: Path, result: dict[str, Any]) -> None:
    path = Path(state_dir) / RESULT_FILE
    tmp = path.with_name(f".{RESULT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def load(state_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(state_dir) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
