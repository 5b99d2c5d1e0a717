"""Users' SSH public keys in LabVM's database (shared by the hub, the admin service and
the gateway)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Integer, String, Text, delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .. import db
from .keys import MAX_KEYS, BadKey, PublicKey, parse


class _Base(DeclarativeBase):
    pass


class SSHKeyRow(_Base):
    __tablename__ = "labvm_ssh_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    fingerprint: Mapped[str] = mapped_column(String(100))
    line: Mapped[str] = mapped_column(Text)
    added: Mapped[str] = mapped_column(String(40))


class KeyStore:
    """The keys of every user."""

    def __init__(self, engine: Engine | str) -> None:
        self.engine = db.engine(engine) if isinstance(engine, str) else engine
        _Base.metadata.create_all(self.engine)

    def keys(self, user: str) -> list[dict]:
        """``user``'s keys, oldest first: {id, fingerprint, algorithm, comment, added}."""
        with Session(self.engine) as s:
            rows = s.scalars(select(SSHKeyRow).where(SSHKeyRow.user == user)
                             .order_by(SSHKeyRow.id)).all()
            return [_row_json(r) for r in rows]

    def public_keys(self, user: str) -> list[PublicKey]:
        with Session(self.engine) as s:
            lines = s.scalars(select(SSHKeyRow.line).where(SSHKeyRow.user == user)
                              .order_by(SSHKeyRow.id)).all()
        return [parse(line) for line in lines]

    def add(self, user: str, text: object) -> dict:
        key = parse(text)
        with Session(self.engine) as s:
            n = s.scalar(select(func.count()).where(SSHKeyRow.user == user)) or 0
            if n >= MAX_KEYS:
                raise BadKey(f"you already have {MAX_KEYS} keys: delete one first")
            if s.scalar(select(SSHKeyRow.id).where(SSHKeyRow.user == user,
                                                   SSHKeyRow.fingerprint == key.fingerprint)):
                raise BadKey(f"this key ({key.fingerprint}) is already registered")
            row = SSHKeyRow(user=user, fingerprint=key.fingerprint, line=key.line,
                            added=datetime.now(UTC).isoformat(timespec="seconds"))
            s.add(row)
            s.commit()
            return _row_json(row)

    def delete(self, user: str, key_id: int) -> bool:
        """Delete one of ``user``'s keys (never another user's); False if none matched."""
        with Session(self.engine) as s:
            n = s.execute(delete(SSHKeyRow).where(SSHKeyRow.user == user,
                                                  SSHKeyRow.id == key_id)).rowcount
            s.commit()
        return bool(n)

    def forget_departed(self, users: dict[str, str | None]) -> list[tuple[str, str]]:
        """Delete the keys of users the hub no longer has, and those added before the
        hub's user of that name was created (a deleted account's, under a new one's name).

        ``users``: every hub user's name -> its creation time (ISO 8601; None: unknown).
        Returns (user, fingerprint) of each key deleted."""
        gone: list[tuple[str, str]] = []
        with Session(self.engine) as s:
            for r in s.scalars(select(SSHKeyRow)).all():
                if r.user in users and not _before(r.added, users[r.user]):
                    continue
                gone.append((r.user, r.fingerprint))
                s.delete(r)
            s.commit()
        return gone


def _before(added: str, created: str | None) -> bool:
    if not created:
        return False
    try:
        # ``added`` is cut to the second: only a whole second earlier is surely before.
        return (datetime.fromisoformat(added) + timedelta(seconds=1)
                <= datetime.fromisoformat(created).astimezone(UTC))
    except ValueError:
        return False


def _row_json(r: SSHKeyRow) -> dict:
    algorithm, _, rest = r.line.partition(" ")
    comment = rest.partition(" ")[2]
    return {"id": r.id, "fingerprint": r.fingerprint, "algorithm": algorithm,
            "comment": comment, "added": r.added}
