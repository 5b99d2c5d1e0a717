"""Versioned layer store on a local directory or a MooseFS mount.

Layout under the store root, per key (a validated user or user.server name)::

    <key>/versions/<N>/      immutable, published versions
    <key>/current            symlink -> versions/<N>, swapped atomically
    <key>/.staging/<N>/      versions being built; never visible as current
    <key>/.trash/            pruned versions and merged pending layers being deleted
    <key>/upper-sync/        background copy of the live upper (see sync.py)
    <key>/pending/<S>/       frozen copies of a former node's upper, stacked above current
                             until merged into a version (<S>.merged marks one that is)
    <key>/owner.json         the node whose upper is live, and its generation (handover)
    <key>/synced.json        the last sync of the live upper (record_sync, last_sync)
    <key>/quota.json         the key's store quota, and the last commit it refused (quota.py)
    <key>/.lock              flock held by every mutating operation

A version becomes visible only by renaming a finished staging directory into
``versions/`` and then atomically replacing the ``current`` symlink, so a crash
leaves either the old or the new version current. Anything under ``versions/``
is complete; a version newer than ``current`` is a publish that never finished
and is dropped by recovery (its upper is still there to be merged again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..names import is_key
from . import safepath
from .crash import crashpoint
from .errors import StoreError
from .fsops import fsync_dir, syncfs
from .handover import HandOver
from .leases import Leases
from .merge import MergeStats, apply_upper, scan_upper
from .quota import StoreQuotaExceeded, set_mirror_limit, tree_bytes
from .treecopy import copy_tree

log = logging.getLogger("labvm.storage")

__all__ = ["LayerStore", "StoreError", "StoreQuotaExceeded", "open_store", "FsckReport"]

DEFAULT_KEEP = int(os.environ.get("LABVM_STORE_KEEP", "5"))


@dataclass
class FsckReport:
    """What fsck found (``problems``) and, with repair, what it did (``repaired``)."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


class LayerStore(HandOver, Leases):
    """Numbered, immutable layer versions for each key, with an atomic current pointer;
    the hand-over between nodes (``handover.HandOver``), the leases of mounted roots
    (``leases.Leases``) and the sync record on top."""

    def __init__(self, root: str | os.PathLike[str], keep: int = DEFAULT_KEEP) -> None:
        self.root = Path(root)
        if keep < 1:
            raise StoreError("keep must be at least 1")
        self.keep = keep
        # What the last prune of each key kept past ``keep`` for a lease: {version: holders}.
        self.skipped: dict[str, dict[int, list[str]]] = {}

    # ---- layout -------------------------------------------------------------
    def key_dir(self, key: str) -> Path:
        if not is_key(key):
            raise StoreError(f"invalid layer key {key!r}")
        return self.root / key

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if is_key(p.name) and p.is_dir() and not p.is_symlink())

    def versions(self, key: str) -> list[int]:
        """Published version numbers of ``key``, oldest first."""
        vdir = self.key_dir(key) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit())

    def current_version(self, key: str) -> int | None:
        link = self.key_dir(key) / "current"
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        name = Path(target).name
        return int(name) if name.isdigit() else None

    def version_path(self, key: str, n: int) -> Path:
        return self.key_dir(key) / "versions" / str(n)

    def sync_path(self, key: str) -> Path:
        """Where the background sync keeps the copy of this key's live upper."""
        return self.key_dir(key) / "upper-sync"

    def record_sync(self, key: str, t: float, node: str, gen: int | None, changed: int,
                    errors: int, quota_errors: int = 0) -> None:
        """Note a finished sync of ``key``'s upper (``<key>/synced.json``): when it
        started, by which node and generation, and how many entries it could not copy
        (``quota_errors`` of them for the store quota)."""
        path = self.key_dir(key) / "synced.json"
        tmp = path.with_name(f".synced.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"t": t, "node": node, "gen": gen, "changed": changed,
                                   "errors": errors, "quota_errors": quota_errors}))
        os.replace(tmp, path)

    def record_progress(self, key: str, progress: dict) -> None:
        """Note how far a running sync of ``key`` is (``<key>/sync-progress.json``)."""
        path = self.key_dir(key) / "sync-progress.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".progress.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in dict(progress, t=time.time()).items()
                                   if v != float("inf")}))
        os.replace(tmp, path)

    def clear_progress(self, key: str) -> None:
        (self.key_dir(key) / "sync-progress.json").unlink(missing_ok=True)

    def sync_progress(self, key: str, fresh_s: float = 30) -> dict | None:
        """The running sync's last ``record_progress``, if it is recent."""
        try:
            with open(self.key_dir(key) / "sync-progress.json", encoding="utf-8") as f:
                rec = json.load(f)
            if time.time() - float(rec["t"]) > fresh_s:
                return None
            return {k: float(rec[k]) for k in ("seen", "copied", "bytes", "rate")
                    } | {"eta_s": float(rec["eta_s"]) if "eta_s" in rec else None}
        except (OSError, ValueError, KeyError, TypeError, StoreError):
            return None

    def last_sync(self, key: str) -> dict | None:
        """The last ``record_sync`` of ``key`` ({"t", "node", "gen", "changed", "errors"}),
        None if none; every field checked (the store is shared)."""
        try:
            with open(self.key_dir(key) / "synced.json", encoding="utf-8") as f:
                rec = json.load(f)
            errors = rec.get("errors", 0)
            quota_errors = rec.get("quota_errors", 0)
            gen = rec.get("gen")
            return {"t": float(rec["t"]), "node": str(rec.get("node") or ""),
                    "gen": gen if type(gen) is int else None,
                    "changed": int(rec.get("changed") or 0),
                    "errors": errors if type(errors) is int and errors >= 0 else 0,
                    "quota_errors": quota_errors if type(quota_errors) is int
                    and quota_errors >= 0 else 0}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StoreError):
            return None

    # ---- the store quota (quota.py) -------------------------------------------------
    def _quota_record(self, key: str) -> dict:
        try:
            with open(self.key_dir(key) / "quota.json", encoding="utf-8") as f:
                rec = json.load(f)
            return rec if isinstance(rec, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_quota_record(self, key: str, rec: dict) -> None:
        path = self.key_dir(key) / "quota.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".quota.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, path)

    def quota(self, key: str) -> int | None:
        """Bytes of files one version of ``key`` may hold; None: no quota."""
        limit = self._quota_record(key).get("bytes")
        return limit if type(limit) is int and limit > 0 else None

    def set_quota(self, key: str, limit: int | None) -> None:
        rec = self._quota_record(key)
        if rec.get("bytes") == limit and "bytes" in rec:
            return
        set_mirror_limit(self.sync_path(key), limit)
        self._write_quota_record(key, {**rec, "bytes": limit})

    def quota_usage(self, key: str) -> int | None:
        """Bytes of files in the newest version committed under a quota, if any."""
        got = self._quota_record(key).get("version_bytes")
        return got if type(got) is int and got >= 0 else None

    def quota_refusal(self, key: str) -> dict | None:
        """The last commit refused for the quota ({"t", "bytes", "limit"}), if any."""
        got = self._quota_record(key).get("refused")
        if not isinstance(got, dict):
            return None
        try:
            return {k: float(got[k]) if k == "t" else int(got[k]) for k in ("t", "bytes", "limit")}
        except (KeyError, TypeError, ValueError):
            return None

    def _check_quota(self, key: str, built: Path, cur: int | None) -> None:
        limit = self.quota(key)
        rec = self._quota_record(key)
        if limit is None:
            return
        size = tree_bytes(built)
        if size <= limit:  # what the page shows against the quota, until the next commit
            self._write_quota_record(key, {**{k: v for k, v in rec.items() if k != "refused"},
                                           "version_bytes": size})
            return
        safepath.remove_tree(built)  # nothing half-written stays
        self._write_quota_record(key, {**rec, "refused": {"t": time.time(), "bytes": size,
                                                          "limit": limit}})
        raise StoreQuotaExceeded(
            f"{key}: the new version would hold {size >> 20} MiB of files, over its store "
            f"quota of {limit >> 20} MiB; version {cur} stays current and nothing was "
            "written (free space in the server, or ask an admin for a bigger quota)")

    # ---- locking and recovery ---------------------------------------------------
    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Exclusive per-key lock (flock; released by the kernel if we die)."""
        kdir = self.key_dir(key)
        kdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(kdir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _check_key(self, key: str, repair: bool, report: FsckReport, deep: bool = True) -> None:
        kdir = self.key_dir(key)

        def fix(problem: str, action) -> None:  # type: ignore[no-untyped-def]
            report.problems.append(f"{key}: {problem}")
            if repair:
                action()
                report.repaired.append(f"{key}: {problem}")

        for sub in (".staging", ".trash"):
            d = kdir / sub
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    what = "partial version" if sub == ".staging" else "half-deleted version"
                    fix(f"{what} {sub}/{p.name}", lambda p=p: safepath.remove_tree(p))
        for p in sorted(kdir.glob("upper-sync.index.*.tmp")):
            fix(f"stale sync index {p.name}", lambda p=p: p.unlink())
        for p in sorted(kdir.glob(".current.*.tmp")):
            fix(f"stale link {p.name}", lambda p=p: p.unlink())
        vdir = kdir / "versions"
        if vdir.is_dir():
            for p in sorted(vdir.iterdir()):
                if not p.name.isdigit() or not p.is_dir() or p.is_symlink():
                    fix(f"stray entry versions/{p.name}", lambda p=p: safepath.remove_tree(p))
        versions = [n for n in self.versions(key) if self.version_path(key, n).is_dir()]
        cur = self.current_version(key)
        link = kdir / "current"
        if cur is None or cur not in versions:
            if link.is_symlink() or versions:
                state = "missing" if not link.is_symlink() else f"dangling ({os.readlink(link)})"
                if versions:
                    fix(f"current is {state}; pointing it at version {versions[-1]}",
                        lambda: self._swap_current(key, versions[-1]))
                else:
                    fix(f"current is {state} and no version exists; removing it", link.unlink)
            return
        held = self.leased_versions(key)
        for n in versions:
            if n > cur and n in held:
                report.problems.append(f"{key}: version {n} is newer than current {cur}, but "
                                       f"node(s) {', '.join(held[n])} use it: left in place")
            elif n > cur:
                fix(f"version {n} is newer than current {cur} (unfinished publish); dropping it",
                    lambda n=n: self._delete_version(key, n))
        sync_dir = self.sync_path(key)
        if deep and sync_dir.is_dir():  # a full walk: fsck only, not every commit
            for rel in _sync_temps(sync_dir, repair):
                report.problems.append(f"{key}: sync temp file upper-sync/{rel}")
                if repair:
                    report.repaired.append(f"{key}: sync temp file upper-sync/{rel}")

    def _recover(self, key: str) -> None:
        """Called with the key lock held: finish or roll back whatever a crash left."""
        self._check_key(key, True, FsckReport(), deep=False)

    def fsck(self, repair: bool = False, keys: list[str] | None = None) -> FsckReport:
        """Check every key (or ``keys``); with ``repair``, fix what is found."""
        report = FsckReport()
        for key in keys if keys is not None else self.keys():
            with self.locked(key):
                self._check_key(key, repair, report)
        return report

    # ---- publishing ---------------------------------------------------------------
    def _staging(self, key: str, n: int) -> Path:
        staging = self.key_dir(key) / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / str(n)
        safepath.remove_tree(tmp)
        return tmp

    def _next_number(self, key: str) -> int:
        return max(self.versions(key), default=0) + 1

    def current_path(self, key: str) -> Path:
        """The current version's directory, creating an empty version 1 first if there is none."""
        n = self.current_version(key)
        if n is None or not self.version_path(key, n).is_dir():
            with self.locked(key):
                self._recover(key)
                n = self.current_version(key)
                if n is None:
                    tmp = self._staging(key, 1)
                    tmp.mkdir()
                    tmp.chmod(0o755)
                    crashpoint("init.staged")
                    self.publish(key, 1, tmp)
                    n = 1
        return self.version_path(key, n)

    def publish(self, key: str, n: int, built: Path) -> None:
        """Make the finished directory ``built`` version ``n`` and point ``current`` at it."""
        kdir = self.key_dir(key)
        final = kdir / "versions" / str(n)
        final.parent.mkdir(parents=True, exist_ok=True)
        if Path(built) != final:
            syncfs(built)  # contents durable before the name makes them visible
            crashpoint("publish.synced")
            os.rename(built, final)
            fsync_dir(final.parent)
        crashpoint("publish.renamed")
        self._swap_current(key, n)
        crashpoint("publish.swapped")

    def _swap_current(self, key: str, n: int) -> None:
        kdir = self.key_dir(key)
        tmp_link = kdir / f".current.{n}.tmp"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        os.symlink(f"versions/{n}", tmp_link)
        crashpoint("publish.link_created")
        os.replace(tmp_link, kdir / "current")
        fsync_dir(kdir)

    def _delete_version(self, key: str, n: int) -> None:
        """Move the version out of versions/ first, so a crash never leaves half of one there."""
        trash = self.key_dir(key) / ".trash"
        trash.mkdir(exist_ok=True)
        target = trash / str(n)
        safepath.remove_tree(target)
        os.rename(self.version_path(key, n), target)
        crashpoint("delete.renamed")
        safepath.remove_tree(target)
        crashpoint("delete.removed")

    def prune(self, key: str, keep: int | None = None) -> list[int]:
        """Delete all but the newest ``keep`` versions, never the current one nor one a
        live lease holds (a root mounted over it somewhere; see ``skipped``)."""
        keep = keep or self.keep
        with self.locked(key):
            return self._prune(key, keep)

    def _prune(self, key: str, keep: int) -> list[int]:
        cur = self.current_version(key)
        versions = self.versions(key)
        held = self.leased_versions(key)
        doomed = [n for n in versions[:-keep] if n != cur and n not in held]
        self.skipped[key] = {n: held[n] for n in versions[:-keep] if n != cur and n in held}
        for n, holders in self.skipped[key].items():
            log.info("%s: keeping version %d past keep=%d, in use on node(s) %s", key, n,
                     keep, ", ".join(holders))
        for n in doomed:
            self._delete_version(key, n)
            crashpoint("prune.one")
        return doomed

    # ---- operations ---------------------------------------------------------------
    def commit(self, key: str, upper: str | Path,
               workers: int | None = None) -> tuple[int, MergeStats]:
        """Merge ``upper`` onto a copy of the current version and publish it as a new version."""
        tree = scan_upper(upper, workers)  # refuses bad uppers before anything is written
        base = self.current_path(key)
        with self.locked(key):
            self._recover(key)
            crashpoint("commit.recovered")
            cur = self.current_version(key)
            base = self.version_path(key, cur) if cur is not None else base
            n = self._next_number(key)
            tmp = self._staging(key, n)
            copy_tree(base, tmp, workers)
            crashpoint("commit.copied")
            # A version is a layer over the image: deletions and opaque directories
            # must keep hiding what the image has below them.
            stats = apply_upper(tree, upper, tmp, workers, layer=True)
            crashpoint("commit.merged")
            self._check_quota(key, tmp, cur)
            self.publish(key, n, tmp)
            crashpoint("commit.published")
            self._prune(key, self.keep)
            crashpoint("commit.pruned")
        return n, stats

    def restore(self, key: str, n: int) -> int:
        """Make a NEW version whose content is version ``n``; history is never rewritten.
        Refused while the root runs anywhere (a live lease): it would change under it."""
        with self.locked(key):
            self.refuse_if_leased(key, "restoring a version")
            self._recover(key)
            if n not in self.versions(key):
                raise StoreError(f"{key} has no version {n} (have {self.versions(key)})")
            m = self._next_number(key)
            tmp = self._staging(key, m)
            copy_tree(self.version_path(key, n), tmp)
            crashpoint("restore.copied")
            self.publish(key, m, tmp)
            crashpoint("restore.published")
            self._prune(key, self.keep)
        return m


TMP_PREFIX = ".labvm-sync-tmp."


def _sync_temps(sync_dir: Path, remove: bool) -> list[str]:
    """Paths of the sync's temporary files left in ``sync_dir`` by a crash (removed with
    ``remove``). The copy holds a user's tree: walked through ``safepath``."""
    found: list[str] = []

    def enter(w: safepath.Walk, fds: list[int], _ctx: object) -> tuple[list[str], None]:
        subdirs = []
        for name, st in safepath.scandir(fds[0]).items():
            if name.startswith(TMP_PREFIX):
                found.append(safepath.show((*w.path, name)))
                if remove:
                    safepath.remove(fds[0], name)
            elif stat.S_ISDIR(st.st_mode):
                subdirs.append(name)
        return subdirs, None

    fd = safepath.open_root(sync_dir)
    try:
        safepath.walk([fd], enter, lost=lambda w, e: None)
    finally:
        os.close(fd)
    return found


def open_store(root: str | os.PathLike[str], keep: int = DEFAULT_KEEP) -> LayerStore:
    """Open the store at ``root`` (a local directory or a MooseFS mount point)."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return LayerStore(path, keep)
