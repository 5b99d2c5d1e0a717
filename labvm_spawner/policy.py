"""Per-user resource limits and GPU policy, resolved from plain dicts in jupyterhub_config.

Layers, later ones winning per key: built-in defaults, ``default``, the user's groups
(several groups: the most generous value per key among those that set it), the admin
override (admins only), then the user's own entry. Example::

    c.LabVMSpawner.policy = {"cpus": 4, "mem": "16G", "pids": 4096, "disk": "50G", "max_gpus": 1}
    c.LabVMSpawner.group_policy = {"staff": {"mem": "64G", "max_gpus": 4, "io_read_bps": None}}
    c.LabVMSpawner.user_policy = {"alice": {"gpu_models": ["NVIDIA A100-SXM4-80GB"]}}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import LabVMError
from .node.protocol import MIN_DISK, MIN_MEM, Limits


@dataclass
class GpuPolicy:
    max_gpus: int
    models: list[str] | None  # None: any model
    sharing: bool  # True: this user's GPUs may be shared with other sharing users


BUILTIN_DEFAULTS: dict[str, Any] = {
    "cpus": 2,
    "mem": "8G",
    "pids": 4096,
    "blkio_weight": None,
    "io_read_bps": None,
    "io_write_bps": None,
    "disk": None,
    "store": None,
    "max_gpus": 0,
    "gpu_models": None,
    "gpu_sharing": False,
}
KEYS = tuple(BUILTIN_DEFAULTS)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(?:ib?|b)?|b?)\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like "8G", "512M", "1.5GiB" (binary units, as docker)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    if isinstance(value, float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"not a valid size: {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
        if value.strip().startswith("-"):
            raise ValueError(f"size must not be negative: {value!r}")
    raise ValueError(f"not a size: {value!r} (use bytes or e.g. '512M', '8G')")


def _where(where: str, key: str) -> str:
    return f"LabVM config error in {where}, key {key!r}"


def _number(where: str, key: str, value: Any, *, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        kind = "a whole number" if integer else "a number"
        raise LabVMError(f"{_where(where, key)}: {value!r} is not {kind}")
    if value < 0:
        raise LabVMError(f"{_where(where, key)}: {value!r} must not be negative")
    return value


def _size(where: str, key: str, value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise LabVMError(f"{_where(where, key)}: {e}") from None


def _check_value(where: str, key: str, value: Any) -> Any:
    """The normalised value for ``key``, or LabVMError saying what is wrong."""
    if key == "cpus":
        v = _number(where, key, value, integer=False)
        if v == 0:
            raise LabVMError(f"{_where(where, key)}: must be more than 0")
        return float(v)
    if key == "mem":
        v = _size(where, key, value)
        if v < MIN_MEM:
            raise LabVMError(f"{_where(where, key)}: {value!r} is below docker's minimum of 6M")
        return v
    if key == "pids":
        v = _number(where, key, value, integer=True)
        if v == 0:
            raise LabVMError(f"{_where(where, key)}: must be at least 1")
        return v
    if key == "blkio_weight":
        if value is None:
            return None
        v = _number(where, key, value, integer=True)
        if not 10 <= v <= 1000:
            raise LabVMError(f"{_where(where, key)}: {value!r} is outside docker's range 10..1000")
        return v
    if key in ("io_read_bps", "io_write_bps"):
        if value is None:
            return None
        v = _size(where, key, value)
        return v or None  # 0 means no limit, as with docker
    if key in ("disk", "store"):
        if value is None:
            return None
        v = _size(where, key, value)
        if v < MIN_DISK:
            raise LabVMError(f"{_where(where, key)}: {value!r} is below the minimum of "
                             f"{MIN_DISK >> 20}M (None means no quota)")
        return v
    if key == "max_gpus":
        return _number(where, key, value, integer=True)
    if key == "gpu_models":
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(m, str) and m for m in value)
        ):
            raise LabVMError(
                f"{_where(where, key)}: must be None (any model) or a non-empty list of "
                "model names as NVML reports them; use max_gpus: 0 to deny GPUs"
            )
        return list(dict.fromkeys(value))
    if key == "gpu_sharing":
        if not isinstance(value, bool):
            raise LabVMError(f"{_where(where, key)}: {value!r} is not true/false")
        return value
    raise AssertionError(key)  # callers check keys first


def _check(where: str, entry: Any) -> dict[str, Any]:
    if entry is None:
        return {}
    if not isinstance(entry, Mapping):
        raise LabVMError(f"LabVM config error in {where}: expected a dict, got {entry!r}")
    unknown = sorted(str(k) for k in entry if k not in BUILTIN_DEFAULTS)
    if unknown:
        raise LabVMError(
            f"LabVM config error in {where}: unknown key(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(KEYS)})"
        )
    return {k: _check_value(where, k, v) for k, v in entry.items()}


def _max_or_none_wins(values: list[Any]) -> Any:
    return None if None in values else max(values)


def _union_models(values: list[list[str] | None]) -> list[str] | None:
    if None in values:
        return None
    return list(dict.fromkeys(m for ms in values for m in ms))


# How several groups combine: the value most generous to the user.
_GENEROUS: dict[str, Callable[[list[Any]], Any]] = {
    "cpus": max,
    "mem": max,
    "pids": max,
    "blkio_weight": lambda vs: max((v for v in vs if v is not None), default=None),
    "io_read_bps": _max_or_none_wins,  # None = unlimited
    "io_write_bps": _max_or_none_wins,
    "disk": _max_or_none_wins,
    "store": _max_or_none_wins,
    "max_gpus": max,
    "gpu_models": _union_models,
    "gpu_sharing": all,  # an exclusive GPU is the better deal
}


def validate_config(
    default: Mapping[str, Any],
    group_overrides: Mapping[str, Mapping[str, Any]],
    admin_override: Mapping[str, Any],
    user_overrides: Mapping[str, Mapping[str, Any]],
) -> None:
    """Check every entry (for hub start-up); resolve_policy checks only those it uses."""
    _check("LabVMSpawner.policy", default)
    for name, entry in (group_overrides or {}).items():
        _check(f"LabVMSpawner.group_policy[{name!r}]", entry)
    _check("LabVMSpawner.admin_policy", admin_override)
    for name, entry in (user_overrides or {}).items():
        _check(f"LabVMSpawner.user_policy[{name!r}]", entry)


def resolve_policy(
    user: str,
    groups: list[str],
    is_admin: bool,
    default: Mapping[str, Any],
    group_overrides: Mapping[str, Mapping[str, Any]],
    admin_override: Mapping[str, Any],
    user_overrides: Mapping[str, Mapping[str, Any]],
) -> tuple[Limits, GpuPolicy]:
    """The limits and GPU policy in force for ``user``; LabVMError on bad config."""
    values = _check("built-in defaults", BUILTIN_DEFAULTS)
    values.update(_check("LabVMSpawner.policy", default))

    group_entries = [
        _check(f"LabVMSpawner.group_policy[{g!r}]", group_overrides[g])
        for g in dict.fromkeys(groups)
        if group_overrides and g in group_overrides
    ]
    for key, combine in _GENEROUS.items():
        set_by_groups = [e[key] for e in group_entries if key in e]
        if set_by_groups:
            values[key] = combine(set_by_groups)

    if is_admin:
        values.update(_check("LabVMSpawner.admin_policy", admin_override))
    if user_overrides and user in user_overrides:
        values.update(_check(f"LabVMSpawner.user_policy[{user!r}]", user_overrides[user]))

    limits = Limits(
        cpus=values["cpus"],
        mem_bytes=values["mem"],
        pids=values["pids"],
        blkio_weight=values["blkio_weight"],
        io_read_bps=values["io_read_bps"],
        io_write_bps=values["io_write_bps"],
        disk_bytes=values["disk"],
        store_bytes=values["store"],
    )
    gpu = GpuPolicy(
        max_gpus=values["max_gpus"],
        models=values["gpu_models"],
        sharing=values["gpu_sharing"],
    )
    return limits, gpu
