"""``labvm storage ...``: merge, commit, sync, versions, restore, prune, fsck.

Exit codes: 0 ok, 1 the operation failed (or fsck found problems it did not
repair), 2 bad arguments (nothing was touched).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from ..storage.errors import MergeRefused, StoreError
from ..storage.merge import check_merge_args, merge_into_new
from ..storage.store import DEFAULT_KEEP, open_store

EXIT_FAILED = 1
EXIT_USAGE = 2


# Where the one-node default keeps its state (LabVMSpawner.state_dir) and its store.
DEFAULT_STATE = "/var/lib/labvm"
DEFAULT_STORE = f"{DEFAULT_STATE}/store"


class _UsageError(StoreError):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the storage subcommands to ``subparsers``."""

    def store_args(p: argparse.ArgumentParser) -> None:
        default = Path(os.environ.get("LABVM_STORE", DEFAULT_STORE))
        p.add_argument("--store", type=Path, default=default,
                       help="store root, local or MooseFS (default: $LABVM_STORE or the "
                       f"one-node default {DEFAULT_STORE})")

    p = subparsers.add_parser("merge", help="write lower+upper, as the overlay shows it, into a "
                              "new directory")
    p.add_argument("--lower", required=True, type=Path)
    p.add_argument("--upper", required=True, type=Path)
    p.add_argument("--into", required=True, type=Path, help="new directory (must not exist)")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(storage_func=_merge)

    p = subparsers.add_parser("commit", help="merge an upper into a new version of KEY")
    p.add_argument("key")
    store_args(p)
    p.add_argument("--upper", type=Path, default=None,
                   help="upper directory (default: the key's synced upper in the store)")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="versions to keep")
    p.set_defaults(storage_func=_commit)

    p = subparsers.add_parser("sync", help="copy a live upper's changes into the store")
    store_args(p)
    p.add_argument("--upper", type=Path, default=None,
                   help=f"the live upper (default: {DEFAULT_STATE}/uppers/KEY/upper)")
    p.add_argument("--key", required=True)
    p.add_argument("--watch", action="store_true",
                   help="keep running: journal changes with inotify, sync every --interval")
    p.add_argument("--interval", type=float, default=5.0)
    p.set_defaults(storage_func=_sync)

    p = subparsers.add_parser("versions", help="list KEY's versions (* marks current)")
    p.add_argument("key")
    store_args(p)
    p.set_defaults(storage_func=_versions)

    p = subparsers.add_parser("restore", help="make a new version of KEY with version N's content")
    p.add_argument("key")
    p.add_argument("n", type=int)
    store_args(p)
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    p.set_defaults(storage_func=_restore)

    p = subparsers.add_parser("prune", help="delete all but the newest --keep versions of KEY")
    p.add_argument("key")
    store_args(p)
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP)
    p.set_defaults(storage_func=_prune)

    p = subparsers.add_parser("take-over", help="make NODE the owner of KEY's live upper; "
                              "what was synced so far is frozen as a pending layer")
    store_args(p)
    p.add_argument("key")
    p.add_argument("node")
    p.set_defaults(storage_func=_take_over)

    p = subparsers.add_parser("merge-pending", help="merge KEY's pending layers into new "
                              "versions")
    store_args(p)
    p.add_argument("key")
    p.set_defaults(storage_func=_merge_pending)

    p = subparsers.add_parser("fsck", help="check the store; --repair fixes what a crash left")
    store_args(p)
    p.add_argument("--repair", action="store_true")
    p.add_argument("--key", action="append", default=None, help="only these keys")
    p.set_defaults(storage_func=_fsck)


def _existing_store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if not args.store.is_dir():
        raise _UsageError(f"--store {args.store} is not a directory")
    return open_store(args.store, getattr(args, "keep", DEFAULT_KEEP))


def _merge(args: argparse.Namespace) -> int:
    try:
        check_merge_args(args.lower, args.upper, args.into)
    except StoreError as e:
        raise _UsageError(str(e)) from e
    stats = merge_into_new(args.lower, args.upper, args.into, args.workers)
    print(f"merged {stats.files} entries, {stats.dirs} directories, "
          f"{stats.whiteouts} whiteouts into {args.into}")
    return 0


def _commit(args: argparse.Namespace) -> int:
    store = open_store(args.store, args.keep)  # the first commit may create the store
    upper = args.upper or store.sync_path(args.key)
    if not upper.is_dir():
        raise _UsageError(f"upper {upper} is not a directory")
    n, stats = store.commit(args.key, upper)
    print(f"{args.key}: version {n} ({stats.files} entries, {stats.whiteouts} whiteouts merged)")
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _sync(args: argparse.Namespace) -> int:
    from ..storage.sync import UpperSync

    if args.upper is None:
        state = Path(os.environ.get("LABVM_STATE_DIR", DEFAULT_STATE))
        args.upper = state / "uppers" / args.key / "upper"
    if not args.upper.is_dir():
        raise _UsageError(f"--upper {args.upper} is not a directory")
    store = open_store(args.store)
    printer = _progress_printer(sys.stderr)
    syncer = UpperSync(args.upper, store.sync_path(args.key), journal=args.watch,
                       progress=printer)
    if args.watch:  # stop cleanly on SIGTERM too, so the index is saved for a fast restart
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        stats = syncer.sync()
        printer.done()
        print(f"synced {stats}", flush=True)
        failures = 0
        while args.watch:
            # Back off while a pass keeps failing as a whole (store unreachable, say); a
            # user's hostile entry never gets here: it is counted in the stats instead.
            time.sleep(min(args.interval * 2 ** failures, 60.0))
            try:
                stats = syncer.sync()
                failures = 0
            except OSError as e:
                failures += 1
                print(f"labvm storage: sync failed, retrying: {e}", file=sys.stderr, flush=True)
                continue
            if stats.changed or stats.errors:
                print(f"synced {stats}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        syncer.close()
    return 0


def progress_line(p: dict[str, float]) -> str:
    """A pass's progress for people: entries, bytes, rate and what is left."""
    eta = p["eta_s"]
    left = "" if eta == float("inf") else f", about {_duration(eta)} left"
    return (f"{int(p['copied']):,} of at least {int(p['seen']):,} entries, "
            f"{p['bytes'] / 2**30:.2f} GiB, {p['rate']:.0f}/s{left}")


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


class _progress_printer:  # noqa: N801 - used as a function
    """A progress bar (one rewritten line) on a terminal, plain lines otherwise."""

    def __init__(self, out) -> None:  # noqa: ANN001
        self.out, self.tty, self.open = out, out.isatty(), False

    def __call__(self, p: dict[str, float]) -> None:
        if self.tty:
            self.out.write(f"\r\x1b[Ksyncing: {progress_line(p)}")
            self.open = True
        else:
            self.out.write(f"syncing: {progress_line(p)}\n")
        self.out.flush()

    def done(self) -> None:
        if self.open:
            self.out.write("\n")
            self.open = False


def _versions(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    cur = store.current_version(args.key)
    for n in store.versions(args.key):
        print(f"{n}{' *' if n == cur else ''}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    if args.n not in store.versions(args.key):
        raise _UsageError(f"{args.key} has no version {args.n}")
    m = store.restore(args.key, args.n)
    print(f"{args.key}: version {m} restored from version {args.n}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    for n in store.prune(args.key, args.keep):
        print(f"{args.key}: deleted version {n}")
    for n, holders in store.skipped.get(args.key, {}).items():
        print(f"{args.key}: kept version {n}: in use on node(s) {', '.join(holders)}")
    return 0


def _take_over(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    gen = store.take_over(args.key, args.node)
    print(f"{args.key}: owned by {args.node} (generation {gen}); pending layers "
          f"{store.pending(args.key)}")
    return 0


def _merge_pending(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    made = store.merge_pending(args.key)
    print(f"{args.key}: merged into version(s) {made}")
    return 0


def _fsck(args: argparse.Namespace) -> int:
    store = _existing_store(args)
    report = store.fsck(repair=args.repair, keys=args.key)
    for p in report.problems:
        print(f"{'repaired' if p in report.repaired else 'problem'}: {p}")
    unrepaired = [p for p in report.problems if p not in report.repaired]
    print(f"fsck: {len(report.problems)} problems, {len(report.repaired)} repaired")
    return EXIT_FAILED if unrepaired else 0


def run(args: argparse.Namespace) -> int:
    """Run the storage subcommand chosen in ``args``; returns the exit code."""
    try:
        return args.storage_func(args)
    except _UsageError as e:
        print(f"labvm storage: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MergeRefused as e:
        print(f"labvm storage: refused: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, OSError) as e:
        print(f"labvm storage: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
