"""A node checks every field of a start request: it is untrusted input from the network."""

from __future__ import annotations

import copy

import pytest

from labvm_spawner.errors import LabVMError
from labvm_spawner.node.protocol import StartRequest

GOOD = {
    "key": "alice.work", "username": "alice", "server": "work", "image": "labvm/user:abc123",
    "cmd": ["jupyterhub-singleuser"], "env": {"JUPYTERHUB_USER": "alice"},
    "secrets": {"JUPYTERHUB_API_TOKEN": "t"},
    "limits": {"cpus": 2, "mem_bytes": 4 << 30, "pids": 2048, "blkio_weight": None,
               "io_read_bps": None, "io_write_bps": 200_000_000,
               "disk_bytes": None, "store_bytes": None},
    "gpus": 1, "model": "NVIDIA A100", "sharing": False, "timeout_s": 30,
}


def test_a_good_request_passes() -> None:
    req = StartRequest.from_json(copy.deepcopy(GOOD))
    assert req.checked_limits().mem_bytes == 4 << 30


@pytest.mark.parametrize(("field", "value", "says"), [
    ("username", "bob", "is not the root of user 'bob'"),
    ("server", "", "is not the root of user"),
    ("key", "alice", "is not the root of user"),
    ("key", "../etc", "malformed key"),
    ("image", "labvm/user:x --privileged", "image"),
    ("image", 7, "image"),
    ("cmd", "jupyterhub-singleuser", "cmd"),
    ("cmd", [], "cmd"),
    ("cmd", ["a\0b"], "cmd"),
    ("env", {"LD_PRELOAD=x": "1"}, "env"),
    ("env", {"A": 1}, "env"),
    ("secrets", ["x"], "secrets"),
    ("gpus", -1, "gpus"),
    ("gpus", True, "gpus"),
    ("sharing", "yes", "sharing"),
    ("timeout_s", 0, "timeout_s"),
])
def test_a_bad_field_is_refused(field: str, value: object, says: str) -> None:
    data = copy.deepcopy(GOOD)
    data[field] = value
    with pytest.raises(LabVMError) as e:
        StartRequest.from_json(data)
    assert says in str(e.value)


@pytest.mark.parametrize("limits", [
    {"cpus": 0},
    {"cpus": "2"},
    {"mem_bytes": 1024},
    {"mem_bytes": 2.5e9},
    {"pids": 0},
    {"blkio_weight": 5},
    {"io_read_bps": -1},
    {"extra": 1},
])
def test_limits_out_of_range_are_refused(limits: dict) -> None:
    data = copy.deepcopy(GOOD)
    data["limits"].update(limits)
    with pytest.raises(LabVMError, match="limits"):
        StartRequest.from_json(data)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(LabVMError, match="bad start request"):
        StartRequest.from_json(dict(GOOD, privileged=True))
