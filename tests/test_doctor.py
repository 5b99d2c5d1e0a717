"""labvm-node doctor's checks, one by one: what each finds, and the fix it gives."""

from __future__ import annotations

import email.utils
from pathlib import Path

from labvm_spawner.node import doctor


def test_dockerd_must_remap_users() -> None:
    assert doctor.docker_userns({"SecurityOptions": ["name=seccomp", "name=userns"]}).ok
    bad = doctor.docker_userns({"SecurityOptions": ["name=seccomp"]})
    assert not bad.ok and "userns-remap" in bad.fix
    down = doctor.docker_userns(None, "connection refused")
    assert not down.ok and "connection refused" in down.detail


def test_servers_outlive_a_dockerd_restart_only_with_live_restore() -> None:
    assert doctor.docker_live_restore({"LiveRestoreEnabled": True}).ok
    off = doctor.docker_live_restore({"LiveRestoreEnabled": False})
    assert not off.ok and '"live-restore": true' in off.fix and "stops" in off.detail
    assert not doctor.docker_live_restore(None).ok


def test_gpus_need_the_nvidia_runtime() -> None:
    assert doctor.gpu_runtime(0, set()).ok
    assert doctor.gpu_runtime(8, {"runc", "nvidia"}).ok
    bad = doctor.gpu_runtime(8, {"runc"})
    assert not bad.ok and "nvidia-ctk" in bad.fix


def test_clock_skew_against_the_hub() -> None:
    now = 1_800_000_000.0
    hub = email.utils.formatdate(now - 2, usegmt=True)
    assert doctor.clock("http://hub:8000", now=now, date=hub).ok
    far = doctor.clock("http://hub:8000", now=now,
                       date=email.utils.formatdate(now - 120, usegmt=True))
    assert not far.ok and "+120 s" in far.detail and "NTP" in far.fix
    assert not doctor.clock("http://127.0.0.1:9", now=now).ok  # nothing answers there


def test_disk_and_enrollment(tmp_path: Path) -> None:
    assert doctor.disk(str(tmp_path), min_free=0.0).ok
    full = doctor.disk(str(tmp_path), min_free=1.01)
    assert not full.ok and "GiB free" in full.detail
    assert not doctor.disk(str(tmp_path / "nope")).ok
    assert not doctor.enrollment(str(tmp_path / "th"), str(tmp_path / "tls")).ok
    (tmp_path / "th").write_text("a" * 64 + "\n")
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "node.crt").write_text("x")
    assert doctor.enrollment(str(tmp_path / "th"), str(tmp_path / "tls")).ok


def test_a_local_store_needs_no_moosefs(tmp_path: Path) -> None:
    assert doctor.store_mount("").ok
    local = doctor.store_mount(str(tmp_path))
    assert not local.ok and "not MooseFS" in local.detail and "mfsmount" in local.fix
