"""Building LabVM's images without a registry (``labvm image build``).

No registry is reachable, so the base image is made with ``debootstrap`` and
``docker import``. Every image is tagged with a hash of its inputs: a rebuild
after no change finds the tag and returns in seconds. Unpacking an image as a
node's overlay layer is ``node/rootfs.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker
import docker.errors

log = logging.getLogger(__name__)

# The recipes: images/ of the checkout (through the package's image_recipes link), or
# their copy inside an installed wheel.
IMAGES_DIR = Path(__file__).resolve().parent / "image_recipes"
# The only part of this package that goes into the user image: the desktop.
VNC_DIR = Path(__file__).resolve().parent / "vnc"
USER_IMAGE = "labvm/user:latest"
# Bytecode a host import leaves behind is no input of the image.
_NOT_INPUT = shutil.ignore_patterns("__pycache__", "*.pyc")


def _is_input(path: Path) -> bool:
    return path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"


def _hash_tree(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if _is_input(p))
        for f in files:
            h.update(str(f.relative_to(root.parent)).encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _read_recipe(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def build_base(client: docker.DockerClient, images_dir: Path = IMAGES_DIR) -> str:
    """The debootstrapped Debian base image; returns its tag."""
    recipe_file = images_dir / "base" / "recipe.env"
    tag = f"labvm/base:{_hash_tree(recipe_file)}"
    if _has_image(client, tag):
        return tag
    recipe = _read_recipe(recipe_file)
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    log.info("debootstrapping %s into a new base image %s", recipe["SUITE"], tag)
    with tempfile.TemporaryDirectory(prefix="labvm-base-") as tmp:
        target = Path(tmp) / "root"
        subprocess.run(
            ["debootstrap", f"--variant={recipe['VARIANT']}", recipe["SUITE"], str(target),
             recipe["MIRROR"]],
            check=True, stdout=subprocess.DEVNULL,
        )
        tar = subprocess.Popen(["tar", "-C", str(target), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, check=True,
                       stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrapped tree failed")
    return tag


def _ca_bundle() -> Path:
    for cand in (os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                 "/etc/ssl/certs/ca-certificates.crt"):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise RuntimeError("no CA bundle found for pip (set PIP_CERT)")


def _add_desktop(ctx: Path, vnc_dir: Path) -> None:
    """Put the desktop's code in the build context as a package of its own.

    An empty ``labvm_spawner/__init__.py`` stands in for the real one, which pulls in
    the hub-side code; the image needs none of it.
    """
    pkg = ctx / "desktop" / "labvm_spawner"
    shutil.copytree(vnc_dir, pkg / "vnc", ignore=_NOT_INPUT)
    (pkg / "__init__.py").write_text('"""LabVM, the part that runs in the user\'s container."""\n')


def build_user(client: docker.DockerClient, base_tag: str,
               images_dir: Path = IMAGES_DIR, vnc_dir: Path = VNC_DIR) -> str:
    """The user image on top of ``base_tag``; returns its content tag (also tagged latest).

    The tag hashes exactly what enters the image: ``images/user`` and the desktop
    code, so editing other parts of the package never rebuilds it.
    """
    src = images_dir / "user"
    tag = f"labvm/user:{_hash_tree(src, vnc_dir, extra=base_tag)}"
    if not _has_image(client, tag):
        log.info("building %s", tag)
        with tempfile.TemporaryDirectory(prefix="labvm-user-") as tmp:
            ctx = Path(tmp) / "ctx"
            shutil.copytree(src, ctx, ignore=_NOT_INPUT)
            _add_desktop(ctx, vnc_dir)
            # Build-time only: the Dockerfile deletes it in the step that uses it.
            shutil.copyfile(_ca_bundle(), ctx / "build-ca.crt")
            proc = subprocess.run(
                ["docker", "build", "-q", "--build-arg", f"BASE={base_tag}", "-t", tag, str(ctx)],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"docker build of {tag} failed:\n{proc.stderr[-4000:]}")
    client.images.get(tag).tag(USER_IMAGE)
    return tag


def build_all(client: docker.DockerClient | None = None) -> str:
    client = client or docker.from_env()
    return build_user(client, build_base(client))


def image_id(client: docker.DockerClient, image: str) -> str:
    return client.images.get(image).id.split(":", 1)[-1]
