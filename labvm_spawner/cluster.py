"""The hub's view of its nodes, and the records placement and migration share.

Nodes are the enrolled ones (``labvm_nodes``) plus, in the one-node default, the
node inside the hub process. A node enrolls once with a one-time join token and
its certificate (``enroll``); from then on the hub reaches it only at its enrolled
HTTPS URL with that certificate pinned. Heartbeat records on the shared store
(``node.registry``) are only liveness and capacity, and count only when signed by
the enrolled certificate; any other record is ignored and reported in
``warnings``. Placements (which node holds each root), pins, drained nodes and
migrations are rows in LabVM's database, which the hub and the admin service
both open.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sqlalchemy import BigInteger, Boolean, Float, Integer, String, Text, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import db
from .errors import LabVMError, StoreUnreachable
from .names import check_node_name
from .node import auth, registry
from .node.client import LocalNode, Node, RemoteNode
from .node.protocol import NodeInfo
from .ssh.keystore import KeyStore
from .storage.health import StoreProbe

if TYPE_CHECKING:
    from .node.ops import NodeOps


class _Base(DeclarativeBase):
    pass


class Placement(_Base):
    """The node whose upper holds a root (``key``); a user stays there until moved."""

    __tablename__ = "labvm_placements"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))


class Pin(_Base):
    """An admin's choice of node for every server of a user."""

    __tablename__ = "labvm_pins"
    user: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))


class DiskQuota(_Base):
    """An admin's disk quota for one root, over the policy's (null: no quota)."""

    __tablename__ = "labvm_disk_quotas"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    disk_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    by: Mapped[str] = mapped_column(String(64), default="")
    t: Mapped[float] = mapped_column(Float, default=0.0)


class NodeFlag(_Base):
    __tablename__ = "labvm_node_flags"
    node: Mapped[str] = mapped_column(String(64), primary_key=True)
    drained: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_by: Mapped[str] = mapped_column(String(64), default="")


class EnrolledNode(_Base):
    """A node the hub trusts: where it is, and the certificate it enrolled with."""

    __tablename__ = "labvm_nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(300))
    cert_pem: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(100))
    enrolled_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_by: Mapped[str] = mapped_column(String(64), default="")


class JoinToken(_Base):
    """A one-time, expiring token an admin made for one node (only its hash is kept)."""

    __tablename__ = "labvm_join_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    expires: Mapped[float] = mapped_column(Float)
    made_by: Mapped[str] = mapped_column(String(64), default="")
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Restart(_Base):
    """A server a node going down stopped, to start again (``restart_interrupted``)."""

    __tablename__ = "labvm_restarts"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    server: Mapped[str] = mapped_column(String(255), default="")
    node: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(300))
    t: Mapped[float] = mapped_column(Float)
    options: Mapped[str] = mapped_column(Text, default="{}")  # its user_options, as JSON
    attempts: Mapped[int] = mapped_column(Integer, default=0)


JOIN_TOKEN_TTL_S = 3600
JOIN_TOKEN_PREFIX = "labvm-join-"


class Migration(_Base):
    __tablename__ = "labvm_migrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(100), index=True)
    user: Mapped[str] = mapped_column(String(64))
    server: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(64))
    by: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="running")  # running|done|failed
    step: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    downtime_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class MigrationStep(_Base):
    """Each step a migration went through, with its time: the user's spawn page replays
    them, and the downtime counts from the stop."""

    __tablename__ = "labvm_migration_steps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    migration: Mapped[int] = mapped_column(Integer, index=True)
    t: Mapped[float] = mapped_column(Float)
    step: Mapped[str] = mapped_column(Text)


class MigrationLock(_Base):
    """At most one migration per root at a time: the primary key refuses a second."""

    __tablename__ = "labvm_migration_locks"
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    migration: Mapped[int] = mapped_column(Integer)


@dataclass
class NodeView:
    """A node as placement sees it: up or not, drained or not, and its inventory."""

    name: str
    up: bool
    drained: bool
    info: NodeInfo = field(default_factory=NodeInfo)
    age_s: float | None = None
    local: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.info, NodeInfo):  # a heartbeat's or an agent's JSON
            self.info = NodeInfo.from_json(self.info)

    def free_gpus(self, model: str | None = None, owner: str | None = None) -> list[dict]:
        return self.info.free_gpus(model, owner)

    def as_json(self) -> dict:
        return {"name": self.name, "up": self.up, "drained": self.drained,
                "age_s": self.age_s, "local": self.local, "info": self.info.as_json()}


class Cluster:
    """Nodes and the shared records. One per process and database."""

    def __init__(self, db_url: str, registry_dir: str = "", key_file: str = "",
                 local: NodeOps | None = None,
                 down_after_s: float = registry.DOWN_AFTER_S) -> None:
        self.engine = db.engine(db_url)
        _Base.metadata.create_all(self.engine)
        self.ssh_keys = KeyStore(self.engine)
        self.registry_dir = registry_dir
        self.registry_probe = StoreProbe(registry_dir) if registry_dir else None
        self._last_records: dict = {}
        self.key_file = key_file
        self.local = LocalNode(local) if local is not None else None
        self.down_after_s = down_after_s
        self._key: bytes | None = None
        self._local_info: dict = {}
        self._local_info_t = 0.0
        # What the last look at the heartbeat records found wrong, for the admin page.
        self.warnings: list[str] = []

    # ---- nodes -------------------------------------------------------------------

    async def nodes(self) -> dict[str, NodeView]:
        """The nodes placement may use: enrolled, not revoked (and the in-process one).

        A node is up only while its last heartbeat, signed by its enrolled certificate,
        is fresh. Unsigned, badly signed and unenrolled records are ignored.
        """
        drained = self.drained()
        views: dict[str, NodeView] = {}
        enrolled = self.enrolled()
        warnings: list[str] = []
        records: dict = {}
        if self.registry_probe is not None:
            # The registry is on the layer store: never block on it while it is down.
            store = await asyncio.to_thread(self.registry_probe.check)
            if store.reachable:
                records = await asyncio.to_thread(registry.read_records, self.registry_dir,
                                                  self.down_after_s)
                self._last_records = records
            else:
                # No heartbeat can be read or written meanwhile: the nodes stand as they
                # were last seen (starts are refused, see require_registry), and are still
                # sampled and polled over their own channel.
                records = self._last_records
                since = time.strftime("%H:%M:%S", time.localtime(store.since))
                warnings.append(f"the node registry on the layer store does not answer "
                                f"({store.error}) since {since}; nodes are shown as last seen")
        for name, node in enrolled.items():
            rec = records.get(name)
            if rec is not None and not auth.record_signed_by(node["cert_pem"],
                                                             registry.as_written(rec)):
                warnings.append(f"node {name}: its heartbeat record is not signed by the "
                                "certificate it enrolled with; ignored")
                rec = None
            if rec is None:
                views[name] = NodeView(name, False, name in drained)
            else:
                views[name] = NodeView(name, rec["up"], name in drained,
                                       rec.get("info") or {}, rec["age_s"])
        for name in sorted(records.keys() - enrolled.keys()):
            if self.local is None or name != self.local.name:
                warnings.append(f"{name}: a heartbeat record from a node that is not "
                                "enrolled; ignored")
        self.warnings = warnings
        if self.local is not None:
            if time.monotonic() - self._local_info_t > 2:
                self._local_info = await self.local.info()
                self._local_info_t = time.monotonic()
            views[self.local.name] = NodeView(self.local.name, True,
                                              self.local.name in drained, self._local_info,
                                              0.0, local=True)
        return views

    def require_registry(self) -> None:
        """Refuse a start while the registry (on the layer store) does not answer."""
        store = self.registry_probe.state if self.registry_probe is not None else None
        if store is not None and not store.reachable:
            raise StoreUnreachable(
                f"LabVM's layer store does not answer ({store.error}), so no server can "
                "start now. Running servers go on working; try again in a few minutes."
            )

    def client(self, name: str) -> Node:
        """How to reach node ``name``: only an enrolled, unrevoked node, at its enrolled
        URL with its enrolled certificate (never what a heartbeat record says)."""
        if self.local is not None and name == self.local.name:
            return self.local
        node = self.enrolled().get(name)
        if node is None:
            raise LabVMError(f"unknown node {name!r} (not enrolled, or revoked)")
        return RemoteNode(name, node["url"], self.node_token(name), node["cert_pem"])

    def node_token(self, name: str) -> str:
        """The bearer token the hub calls node ``name`` with (derived from the node key)."""
        if not self.key_file:
            raise LabVMError("LabVM has no node key file configured: cannot reach node "
                             f"{name!r}")
        if self._key is None:  # read once: client() runs on every poll
            self._key = auth.load_key(self.key_file)
        return auth.node_token(self._key, name)

    # ---- enrollment ------------------------------------------------------------------

    def enrolled(self, revoked: bool = False) -> dict[str, dict]:
        """Enrolled nodes ({name: record}); with ``revoked``, revoked ones too."""
        with Session(self.engine) as s:
            rows = s.scalars(select(EnrolledNode))
            return {n.name: _node_json(n) for n in rows if revoked or n.revoked_at is None}

    def make_join_token(self, node: str, by: str, ttl_s: float = JOIN_TOKEN_TTL_S) -> dict:
        """A one-time token for ``node`` to enroll with; shown once, only its hash kept."""
        check_node_name(node)
        if self.local is not None and node == self.local.name:
            raise LabVMError(f"{node!r} is the hub's own node; it needs no enrollment")
        if not 60 <= ttl_s <= 7 * 86400:
            raise LabVMError("a join token lives between 60 seconds and 7 days")
        token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = time.time() + ttl_s
        with Session(self.engine) as s, s.begin():
            s.add(JoinToken(token_hash=_sha256(token), node=node, expires=expires,
                            made_by=by))
        return {"node": node, "token": token, "expires": expires}

    def enroll(self, node: str, url: str, cert_pem: str, token: str) -> dict:
        """Record ``node`` at ``url`` with ``cert_pem``, if ``token`` is its unused, unexpired
        join token (which is then used up). Nothing changes on a refusal."""
        if not isinstance(token, str) or not token.startswith(JOIN_TOKEN_PREFIX):
            raise LabVMError("that is not a join token")
        check_node_name(node)
        url = _check_node_url(url)
        fingerprint = auth.cert_fingerprint(cert_pem)
        host = urlsplit(url).hostname or ""
        if host not in auth.cert_names(cert_pem):
            raise LabVMError(f"the certificate is not valid for {host} (its names: "
                             f"{', '.join(sorted(auth.cert_names(cert_pem))) or 'none'})")
        now = time.time()
        with Session(self.engine) as s, s.begin():
            row = s.get(JoinToken, _sha256(token))
            if row is None or row.node != node:
                raise LabVMError(f"the join token is not one made for node {node}")
            if row.used_at is not None:
                raise LabVMError("the join token was used already; make a new one")
            if row.expires < now:
                raise LabVMError("the join token has expired; make a new one")
            row.used_at = now
            old = s.get(EnrolledNode, node)
            if old is not None:
                s.delete(old)
                s.flush()
            s.add(EnrolledNode(name=node, url=url, cert_pem=cert_pem, fingerprint=fingerprint,
                               enrolled_at=now))
        return {"node": node, "url": url, "fingerprint": fingerprint}

    def revoke(self, node: str, by: str) -> None:
        """Stop trusting ``node`` at once; it needs a new join token to come back."""
        with Session(self.engine) as s, s.begin():
            row = s.get(EnrolledNode, node)
            if row is None or row.revoked_at is not None:
                raise LabVMError(f"{str(node)[:70]!r} is not an enrolled node")
            row.revoked_at, row.revoked_by = time.time(), by

    # ---- records ------------------------------------------------------------------

    def placement(self, key: str) -> str | None:
        with Session(self.engine) as s:
            row = s.get(Placement, key)
            return row.node if row else None

    def placements(self) -> dict[str, str]:
        with Session(self.engine) as s:
            return {p.key: p.node for p in s.scalars(select(Placement))}

    def set_placement(self, key: str, node: str) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(Placement, key)
            if row is None:
                s.add(Placement(key=key, node=node))
            else:
                row.node = node

    def pin(self, user: str) -> str | None:
        with Session(self.engine) as s:
            row = s.get(Pin, user)
            return row.node if row else None

    def pins(self) -> dict[str, str]:
        with Session(self.engine) as s:
            return {p.user: p.node for p in s.scalars(select(Pin))}

    def set_pin(self, user: str, node: str | None) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(delete(Pin).where(Pin.user == user))
            if node:
                s.add(Pin(user=user, node=node))

    def disk_quota(self, key: str) -> tuple[bool, int | None]:
        """(set, bytes) of an admin's disk quota for ``key``; bytes None is no quota."""
        with Session(self.engine) as s:
            row = s.get(DiskQuota, key)
            return (True, row.disk_bytes) if row else (False, None)

    def disk_quotas(self) -> dict[str, int | None]:
        with Session(self.engine) as s:
            return {q.key: q.disk_bytes for q in s.scalars(select(DiskQuota))}

    def set_disk_quota(self, key: str, disk_bytes: int | None, by: str) -> None:
        with Session(self.engine) as s, s.begin():
            s.merge(DiskQuota(key=key, disk_bytes=disk_bytes, by=by, t=time.time()))

    def drained(self) -> set[str]:
        with Session(self.engine) as s:
            return set(s.scalars(select(NodeFlag.node).where(NodeFlag.drained)))

    def set_drained(self, node: str, drained: bool, by: str) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(NodeFlag, node)
            if row is None:
                s.add(NodeFlag(node=node, drained=drained, changed_by=by))
            else:
                row.drained, row.changed_by = drained, by

    # ---- restarts after a node went down --------------------------------------------

    def request_restart(self, key: str, user: str, server: str, node: str, reason: str,
                        options: dict) -> None:
        """Ask for ``key``'s server to be started again; a second ask keeps the first."""
        with Session(self.engine) as s, s.begin():
            if s.get(Restart, key) is None:
                s.add(Restart(key=key, user=user, server=server, node=node, reason=reason,
                              t=time.time(), options=json.dumps(options)))

    def restarts(self) -> list[dict]:
        with Session(self.engine) as s:
            return [{"key": r.key, "user": r.user, "server": r.server, "node": r.node,
                     "reason": r.reason, "t": r.t, "options": json.loads(r.options or "{}"),
                     "attempts": r.attempts}
                    for r in s.scalars(select(Restart).order_by(Restart.t))]

    def restart_attempted(self, key: str) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(Restart, key)
            if row is not None:
                row.attempts += 1

    def drop_restart(self, key: str) -> None:
        """The server started (or will not be restarted): forget the ask."""
        with Session(self.engine) as s, s.begin():
            s.execute(delete(Restart).where(Restart.key == key))

    # ---- migrations ----------------------------------------------------------------

    def begin_migration(self, key: str, user: str, server: str, source: str, target: str,
                        by: str) -> int:
        """Record a new migration; refused while another one of the same root runs."""
        try:
            with Session(self.engine) as s, s.begin():
                m = Migration(key=key, user=user, server=server, source=source, target=target,
                              by=by, started=time.time(), step="accepted")
                s.add(m)
                s.flush()
                s.add(MigrationLock(key=key, migration=m.id))
                return m.id
        except IntegrityError:
            raise LabVMError(f"{key} is already being migrated") from None

    def update_migration(self, mid: int, **changes: object) -> None:
        with Session(self.engine) as s, s.begin():
            m = s.get(Migration, mid)
            if m is None:
                return
            for k, v in changes.items():
                setattr(m, k, v)
            if "step" in changes and changes["step"] != "done":
                s.add(MigrationStep(migration=mid, t=time.time(), step=str(changes["step"])))
            if changes.get("state") in ("done", "failed"):
                m.finished = time.time()
                s.execute(delete(MigrationLock).where(MigrationLock.migration == mid))

    def migration_steps(self, mid: int) -> list[tuple[float, str]]:
        """(time, step) of each step of migration ``mid`` so far, oldest first."""
        with Session(self.engine) as s:
            rows = s.execute(select(MigrationStep.t, MigrationStep.step)
                             .where(MigrationStep.migration == mid)
                             .order_by(MigrationStep.id)).all()
        return [(t, step) for t, step in rows]

    def active_migration(self, key: str) -> dict | None:
        with Session(self.engine) as s:
            lock = s.get(MigrationLock, key)
            m = s.get(Migration, lock.migration) if lock else None
            return _migration_json(m) if m else None

    def migration(self, mid: int) -> dict | None:
        with Session(self.engine) as s:
            m = s.get(Migration, mid)
            return _migration_json(m) if m else None

    def migrations(self, limit: int = 50) -> list[dict]:
        with Session(self.engine) as s:
            rows = s.scalars(select(Migration).order_by(Migration.id.desc()).limit(limit))
            return [_migration_json(m) for m in rows]

    def fail_interrupted(self) -> None:
        """Migrations whose runner died (a restart) are failed, releasing their lock."""
        with Session(self.engine) as s:
            ids = list(s.scalars(select(MigrationLock.migration)))
        for mid in ids:
            self.update_migration(mid, state="failed", error="interrupted by a restart")

    def close(self) -> None:
        self.engine.dispose()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_node_url(url: object) -> str:
    """A node agent's URL: https://HOST:PORT and nothing else (no plain HTTP, no path)."""
    if not isinstance(url, str):
        raise LabVMError("the node URL must be a string")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (parts.scheme != "https" or not parts.hostname or port is None or parts.username
            or parts.password or parts.path not in ("", "/") or parts.query
            or parts.fragment):
        raise LabVMError(f"the node URL must be https://HOST:PORT, not {url[:100]!r}")
    return f"https://{parts.netloc}"


def _node_json(n: EnrolledNode) -> dict:
    return {"name": n.name, "url": n.url, "cert_pem": n.cert_pem, "fingerprint": n.fingerprint,
            "enrolled_at": n.enrolled_at, "revoked_at": n.revoked_at, "revoked_by": n.revoked_by}


def _migration_json(m: Migration) -> dict:
    return {
        "id": m.id, "key": m.key, "user": m.user, "server": m.server, "source": m.source,
        "target": m.target, "by": m.by, "state": m.state, "step": m.step, "error": m.error,
        "started": m.started, "finished": m.finished, "downtime_s": m.downtime_s,
        "started_iso": datetime.fromtimestamp(m.started, UTC).isoformat(timespec="seconds"),
    }
