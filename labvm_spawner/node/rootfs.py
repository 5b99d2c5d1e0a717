"""An image's root filesystem as the shared bottom layer of every overlay root on a node.

``prepare_rootfs`` unpacks it once per image; ``prune_rootfs`` deletes unpacked trees
no root uses (``labvm image prune``).

The archive (``docker export`` of a container made from the image) is unpacked here,
in this process, through ``storage.safepath``: every member's directory is reached
from the layer's root descriptor without following a symlink, so a member such as
``etc -> /host/etc`` followed by ``etc/passwd`` fails the unpack instead of writing
outside the layer. Names with ``..`` are refused. Owners are shifted into dockerd's
userns-remap range as they are written.
"""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker

from ..errors import LabVMError
from ..images import image_id
from ..storage import fsops, safepath
from ..storage.safepath import Parts, remove_tree

_UNPACK_LOCKS: dict[str, threading.Lock] = {}
_UNPACK_LOCKS_GUARD = threading.Lock()

_XATTR = "SCHILY.xattr."
_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
          tarfile.FIFOTYPE: stat.S_IFIFO}


class UnsafeArchive(LabVMError):
    """An image archive member that would land outside the layer."""


def member_parts(name: str) -> Parts:
    """The names of an archive member's path inside the layer (``()`` for the root)."""
    names = [n for n in name.split("/") if n not in ("", ".")]
    if ".." in names:
        raise UnsafeArchive(f"image archive member {name!r} climbs out with '..'")
    try:
        return tuple(safepath.check_name(n) for n in names)
    except ValueError as e:
        raise UnsafeArchive(f"image archive member {name!r}: {e}") from e


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    return {k[len(_XATTR):]: v.encode("utf-8", "surrogateescape")
            for k, v in member.pax_headers.items() if k.startswith(_XATTR)}


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    ns = int(member.mtime * 1_000_000_000)
    return ns, ns


class _Layer:
    """The layer being unpacked: its root descriptor and the directories seen so far."""

    def __init__(self, root: int, shift: int) -> None:
        self.root = root
        self.shift = shift
        self.dirs: list[tuple[Parts, tarfile.TarInfo]] = []

    def parent(self, parts: Parts, member: str) -> int:
        """The directory holding ``parts[-1]``; missing directories on the way are made."""
        fd = os.dup(self.root)
        try:
            for name in parts[:-1]:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    os.chown(name, self.shift, self.shift, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
                try:
                    nfd = safepath.open_child(fd, name)
                except OSError as e:
                    if not safepath.changed(e):
                        raise
                    raise UnsafeArchive(f"image archive member {member!r}: {name!r} on its "
                                        "path is not a directory (a symlink?)") from e
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = member_parts(m.name)
        uid, gid = m.uid + self.shift, m.gid + self.shift
        if not parts:  # the root itself: its metadata comes last
            self.dirs.append((parts, m))
            return
        d = self.parent(parts, m.name)
        name = parts[-1]
        try:
            existing = safepath.lstat_or_none(d, name)
            if m.isdir():
                if existing is None or not stat.S_ISDIR(existing.st_mode):
                    if existing is not None:
                        safepath.remove(d, name)
                    os.mkdir(name, 0o700, dir_fd=d)
                self.dirs.append((parts, m))
                return
            if existing is not None:  # a later member of the same name wins, as in tar
                safepath.remove(d, name)
            if m.isreg():
                self._file(tar, m, d, name, uid, gid)
                return
            if m.issym():
                os.symlink(m.linkname, name, dir_fd=d)
                kind = stat.S_IFLNK
            elif m.islnk():
                target = member_parts(m.linkname)
                if not target:
                    raise UnsafeArchive(f"image archive member {m.name!r} links to the root")
                src = safepath.open_dir(self.root, target[:-1])
                try:
                    os.link(target[-1], name, src_dir_fd=src, dst_dir_fd=d,
                            follow_symlinks=False)
                finally:
                    os.close(src)
                return  # a hard link shares its target's metadata
            elif m.type in _TYPES:
                kind = _TYPES[m.type]
                os.mknod(name, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=d)
            else:
                return  # sockets and the like are not archived; nothing else to make
            fsops.set_meta(d, name, kind, uid, gid, m.mode, _times(m), _xattrs(m))
        finally:
            os.close(d)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, d: int, name: str,
              uid: int, gid: int) -> None:
        src = tar.extractfile(m)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=d)
        try:
            if src is not None:
                while chunk := src.read(1 << 20):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            fsops.set_meta(fd, None, stat.S_IFREG, uid, gid, m.mode, _times(m), _xattrs(m))
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Directory metadata, deepest first: writing entries changed their mtimes."""
        for parts, m in sorted(self.dirs, key=lambda x: -len(x[0])):
            try:
                fd = safepath.open_dir(self.root, parts)
            except OSError as e:
                if not safepath.changed(e):
                    raise
                continue  # replaced by a later member
            try:
                mode = m.mode if parts else 0o755
                fsops.set_meta(fd, None, stat.S_IFDIR, m.uid + self.shift, m.gid + self.shift,
                               mode, _times(m), _xattrs(m))
            finally:
                os.close(fd)


def unpack_shifted(chunks: Iterable[bytes], dest: Path, shift: int) -> None:
    """Unpack the tar stream ``chunks`` into the empty directory ``dest``, owners + ``shift``."""
    root = safepath.open_root(dest)
    try:
        layer = _Layer(root, shift)
        with tarfile.open(fileobj=_ChunkReader(chunks), mode="r|") as tar:
            for member in tar:
                layer.add(tar, member)
        layer.finish()
        os.fchown(root, shift, shift)
        os.fchmod(root, 0o755)
    finally:
        os.close(root)


class _ChunkReader:
    """A file-like reader over the byte chunks docker's export yields."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def prepare_rootfs(client: docker.DockerClient, image: str, cache_dir: Path,
                   shift: int) -> Path:
    """The image's root filesystem unpacked under ``cache_dir``, owners shifted by ``shift``.

    This is the shared bottom layer of every user's overlay. Owners are stored
    shifted into dockerd's userns-remap range, so the container's root (which is
    host uid ``shift``) owns what the image's root owned. Unpacked once per
    image id and shift; a finished tree is marked by renaming it into place.
    """
    final = cache_dir / f"{image_id(client, image)[:24]}-{shift}"
    if final.is_dir():
        return final
    # Ten users' first starts after an image update unpack it once; the others wait for
    # that copy instead of each writing their own (another process may still race us:
    # the rename below settles that).
    with _unpacking(final):
        if final.is_dir():
            return final
        _unpack(client, image, cache_dir, final, shift)
    return final


def _unpacking(final: Path) -> threading.Lock:
    with _UNPACK_LOCKS_GUARD:
        return _UNPACK_LOCKS.setdefault(str(final), threading.Lock())


def _unpack(client: docker.DockerClient, image: str, cache_dir: Path, final: Path,
            shift: int) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir))
    container = client.containers.create(image, command=["/bin/true"])
    try:
        unpack_shifted(container.export(), partial, shift)
        try:
            os.rename(partial, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process unpacked the same image meanwhile: use its copy.
            remove_tree(partial)
    except BaseException:
        remove_tree(partial)
        raise
    finally:
        container.remove(force=True)


def layers_in_use() -> set[str]:
    """Directories that some overlay mount on this host uses as a lower layer."""
    used: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            _, _, rest = line.partition(" - ")
            fstype, _, opts = (rest.split(" ", 2) + ["", ""])[:3]
            if fstype != "overlay":
                continue
            for opt in opts.strip().split(","):
                if opt.startswith("lowerdir="):
                    used.update(opt[len("lowerdir="):].split(":"))
    return used


def prune_rootfs(cache_dir: Path, keep_ids: set[str], partial_age_s: float = 3600,
                 min_age_s: float = 0) -> list[Path]:
    """Delete unpacked image layers that no mount uses and whose image is not kept.

    A tree is named ``<image id prefix>-<shift>``; ``keep_ids`` are image ids, bare or as
    the engine lists them (``sha256:...``). Leftovers of an interrupted unpack
    (``.partial-*``) go once they are older than ``partial_age_s``, so an unpack in
    progress is never hit. A scheduled run passes ``min_age_s``: a tree unpacked that
    recently may be about to be mounted by a start.

    A tree is first renamed aside (``.removing-*``), under the lock a start takes to
    prepare it, then deleted: a start never finds a half-deleted tree under its name, and a
    removal cut short (the node killed) leaves only a leftover the next prune takes.
    """
    if not cache_dir.is_dir():
        return []
    keep = {i.split(":", 1)[-1] for i in keep_ids}
    now = time.time()
    removed = []
    for tree in sorted(cache_dir.iterdir()):
        if tree.name.startswith(_REMOVING):
            remove_tree(tree)
            continue
        if tree.name.startswith(".partial-"):
            if now - tree.stat().st_mtime < partial_age_s:
                continue
            remove_tree(tree)
            removed.append(tree)
            continue
        if any(i.startswith(tree.name.split("-")[0]) for i in keep):
            continue
        with _unpacking(tree):
            # Mounts are read under the lock: a start of this image may have just mounted it.
            if str(tree) in layers_in_use() or now - tree.stat().st_mtime < min_age_s:
                continue
            aside = Path(tempfile.mkdtemp(prefix=f"{_REMOVING}{tree.name}-", dir=cache_dir))
            os.rename(tree, aside / "tree")
        remove_tree(aside)
        removed.append(tree)
    return removed


_REMOVING = ".removing-"  # a tree being deleted: never a name a start looks for
