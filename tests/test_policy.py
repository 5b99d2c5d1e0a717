import pytest

from labvm_spawner.errors import LabVMError
from labvm_spawner.policy import (
    BUILTIN_DEFAULTS,
    GpuPolicy,
    Limits,
    parse_size,
    resolve_policy,
    validate_config,
)

G = 1024**3
M = 1024**2
A100 = "NVIDIA A100-SXM4-80GB"
A6000 = "NVIDIA RTX A6000"

DEFAULT = {"cpus": 4, "mem": "16G", "pids": 2048, "max_gpus": 1}
GROUPS = {
    "students": {
        "cpus": 2,
        "mem": "8G",
        "max_gpus": 1,
        "gpu_models": [A6000],
        "io_read_bps": "50M",
    },
    "staff": {"cpus": 16, "mem": "64G", "max_gpus": 4, "gpu_models": [A100], "io_read_bps": "200M"},
    "ml": {"max_gpus": 8, "gpu_models": None, "blkio_weight": 800},
    "guests": {"cpus": 1, "mem": "2G", "max_gpus": 0, "pids": 256},
}
ADMIN = {"cpus": 32, "mem": "128G"}
USERS = {"alice": {"mem": "24G", "gpu_models": A100}, "root": {"max_gpus": 2}}


def resolve(user="bob", groups=(), is_admin=False, **kw):
    args = {
        "default": DEFAULT,
        "group_overrides": GROUPS,
        "admin_override": ADMIN,
        "user_overrides": USERS,
    }
    args.update(kw)
    return resolve_policy(user, list(groups), is_admin, **args)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8G", 8 * G),
        ("512M", 512 * M),
        ("100M", 100 * M),
        ("1.5G", 1536 * M),
        ("8GiB", 8 * G),
        ("8gb", 8 * G),
        ("64k", 64 * 1024),
        (" 2 T ", 2 * 1024 * G),
        ("4096", 4096),
        (1_000_000, 1_000_000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8X", "G", "-1G", "eight", "", -5, True, None, [8]])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_default_only():
    limits, gpu = resolve()
    assert limits == Limits(
        cpus=4.0,
        mem_bytes=16 * G,
        pids=2048,
        blkio_weight=None,
        io_read_bps=None,
        io_write_bps=None,
    )
    assert gpu == GpuPolicy(max_gpus=1, models=None, sharing=False)


def test_builtin_defaults_fill_an_empty_config():
    limits, gpu = resolve_policy("bob", [], False, {}, {}, {}, {})
    assert limits.cpus == BUILTIN_DEFAULTS["cpus"]
    assert limits.mem_bytes == parse_size(BUILTIN_DEFAULTS["mem"])
    assert gpu.max_gpus == 0 and gpu.models is None


def test_one_group_overrides_default_even_downwards():
    limits, gpu = resolve(groups=["guests"])
    assert (limits.cpus, limits.mem_bytes, limits.pids) == (1.0, 2 * G, 256)
    assert gpu.max_gpus == 0


def test_several_groups_most_generous_per_field():
    limits, gpu = resolve(groups=["students", "staff", "guests"])
    assert limits.cpus == 16.0
    assert limits.mem_bytes == 64 * G
    assert limits.pids == 256  # only guests set pids
    assert limits.io_read_bps == 200 * M
    assert gpu.max_gpus == 4
    assert gpu.models == [A6000, A100]  # union, in group order


def test_none_is_most_generous_for_models_and_io():
    _, gpu = resolve(groups=["staff", "ml"])
    assert gpu.models is None and gpu.max_gpus == 8
    limits, _ = resolve(groups=["staff"], group_overrides={**GROUPS, "x": {"io_read_bps": None}})
    assert limits.io_read_bps == 200 * M  # x is not one of bob's groups
    limits, _ = resolve(
        groups=["staff", "x"], group_overrides={**GROUPS, "x": {"io_read_bps": None}}
    )
    assert limits.io_read_bps is None


def test_unknown_groups_ignored():
    assert resolve(groups=["nosuchgroup"]) == resolve()


def test_admin_override_only_for_admins():
    limits, _ = resolve(groups=["staff"], is_admin=True)
    assert (limits.cpus, limits.mem_bytes) == (32.0, 128 * G)
    assert limits.io_read_bps == 200 * M  # admin override leaves other keys alone
    limits, _ = resolve(groups=["staff"], is_admin=False)
    assert limits.cpus == 16.0


def test_user_entry_wins_last():
    limits, gpu = resolve(user="alice", groups=["staff"], is_admin=True)
    assert limits.mem_bytes == 24 * G  # below the admin and group value: user entry wins
    assert limits.cpus == 32.0
    assert gpu.models == [A100]  # a single string is one model


def test_gpu_sharing_key():
    groups = {"a": {"gpu_sharing": True}, "b": {"gpu_sharing": False}}
    assert resolve(groups=["a"], group_overrides=groups)[1].sharing is True
    # Exclusive GPUs are the better deal, so a user in both gets them.
    assert resolve(groups=["a", "b"], group_overrides=groups)[1].sharing is False


def test_io_and_weight():
    limits, _ = resolve(default={**DEFAULT, "io_write_bps": "100M", "blkio_weight": 300})
    assert limits.io_write_bps == 100 * M and limits.blkio_weight == 300
    limits, _ = resolve(groups=["ml"], default={**DEFAULT, "blkio_weight": 300})
    assert limits.blkio_weight == 800
    limits, _ = resolve(default={**DEFAULT, "io_write_bps": 0})
    assert limits.io_write_bps is None  # 0 means unlimited, as with docker


def test_disk_quota_key():
    limits, _ = resolve(default=DEFAULT)
    assert limits.disk_bytes is None  # no quota unless the admin sets one
    limits, _ = resolve(default={**DEFAULT, "disk": "20G"})
    assert limits.disk_bytes == 20 * G
    # Groups: the most generous wins, and None (no quota) is the most generous.
    limits, _ = resolve(groups=["ml", "staff"], default={**DEFAULT, "disk": "20G"},
                        group_overrides={"ml": {"disk": "100G"}, "staff": {"disk": "50G"}})
    assert limits.disk_bytes == 100 * G
    limits, _ = resolve(groups=["ml", "staff"], default={**DEFAULT, "disk": "20G"},
                        group_overrides={"ml": {"disk": "100G"}, "staff": {"disk": None}})
    assert limits.disk_bytes is None
    limits, _ = resolve(default={**DEFAULT, "store": "100G"})
    assert limits.store_bytes == 100 * G and limits.disk_bytes is None


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"memory": "8G"}, "unknown key(s) 'memory'"),
        ({"cpus": -1}, "'cpus': -1 must not be negative"),
        ({"cpus": 0}, "'cpus': must be more than 0"),
        ({"cpus": "four"}, "'cpus': 'four' is not a number"),
        ({"pids": 1.5}, "'pids': 1.5 is not a whole number"),
        ({"max_gpus": -2}, "'max_gpus': -2 must not be negative"),
        ({"max_gpus": True}, "'max_gpus': True is not a whole number"),
        ({"mem": "-8G"}, "'mem': size must not be negative"),
        ({"mem": "8X"}, "'mem': not a size: '8X'"),
        ({"mem": "1M"}, "below docker's minimum"),
        ({"io_read_bps": "-1M"}, "'io_read_bps': size must not be negative"),
        ({"blkio_weight": 5}, "outside docker's range 10..1000"),
        ({"disk": "10M"}, "'disk': '10M' is below the minimum of 16M"),
        ({"disk": "lots"}, "'disk': not a size: 'lots'"),
        ({"store": "1K"}, "'store': '1K' is below the minimum of 16M"),
        ({"gpu_models": []}, "'gpu_models': must be None"),
        ({"gpu_models": [3]}, "'gpu_models': must be None"),
        ({"gpu_sharing": "yes"}, "'gpu_sharing': 'yes' is not true/false"),
    ],
)
def test_bad_config_is_a_clear_labvm_error(entry, message):
    with pytest.raises(LabVMError) as e:
        resolve(user="alice", user_overrides={"alice": entry})
    assert message in str(e.value)
    assert "LabVMSpawner.user_policy['alice']" in str(e.value)


def test_bad_group_entry_names_the_group():
    with pytest.raises(LabVMError, match=r"LabVMSpawner.group_policy\['staff'\].*'cpu'"):
        resolve(groups=["staff"], group_overrides={"staff": {"cpu": 4}})


def test_bad_entries_of_others_do_not_block_resolution_but_fail_validation():
    users = {"carol": {"mem": "lots"}}
    assert resolve(user="bob", user_overrides=users) == resolve()
    with pytest.raises(LabVMError, match=r"LabVMSpawner.user_policy\['carol'\], key 'mem'"):
        validate_config(DEFAULT, GROUPS, ADMIN, users)
    validate_config(DEFAULT, GROUPS, ADMIN, USERS)


def test_not_a_dict():
    with pytest.raises(LabVMError, match="LabVMSpawner.admin_policy: expected a dict"):
        resolve(is_admin=True, admin_override=["cpus", 4])
