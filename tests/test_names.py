"""Usernames become paths, mount options and accounts: only a safe alphabet passes."""

import pytest

from labvm_spawner.errors import LabVMError
from labvm_spawner.names import check_server_name, check_username, root_key


@pytest.mark.parametrize("name", ["../x", "a,b", "a:b", "x" * 201, "x" * 33, "ünï", "Alice",
                                  "a b", "a/b", "", "-x", "a\nb", "lowerdir=x"])
def test_bad_usernames_are_refused_with_a_clear_message(name):
    with pytest.raises(LabVMError, match="cannot be used for a LabVM container"):
        check_username(name)


@pytest.mark.parametrize("name", ["alice", "bob-2", "_svc", "x" * 32, "a1_b"])
def test_good_usernames_pass(name):
    assert check_username(name) == name


def test_root_keys_separate_named_servers():
    assert root_key("alice") == "alice"
    assert root_key("alice", "work") == "alice.work"
    with pytest.raises(LabVMError, match="server name"):
        check_server_name("../x")
    with pytest.raises(LabVMError, match="server name"):
        root_key("alice", "a,b")


def test_long_name_is_shortened_in_the_message():
    with pytest.raises(LabVMError) as err:
        check_username("x" * 5000)
    assert len(str(err.value)) < 400


# ---- one rule everywhere -------------------------------------------------------------

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ALPHABET = "ab_-.0Z/\n :,"
_names = st.text(alphabet=_ALPHABET, min_size=0, max_size=40) | st.sampled_from(
    ["_bob", "bob\n", "alice.work", "alice.", ".x", "a" * 32, "a" * 33, "a.b.c", "a.b"])


def _accepted_everywhere(key: str) -> dict[str, bool]:
    import re

    from labvm_spawner.names import parse_key
    from labvm_spawner.node import agent
    from labvm_spawner.node.protocol import StartRequest
    from labvm_spawner.storage.store import LayerStore, StoreError

    seen = {"route": re.fullmatch(agent.KEY, key) is not None}
    try:
        LayerStore("/nonexistent").key_dir(key)
        seen["store"] = True
    except StoreError:
        seen["store"] = False
    try:
        user, server = parse_key(key)
        seen["spawner"] = root_key(user, server) == key
    except LabVMError:
        seen["spawner"] = False
    user, _, server = key.partition(".")
    req = StartRequest(key=key, username=user, server=server, image="labvm/user:x",
                       cmd=["x"], env={}, secrets={}, limits={})
    try:
        req.checked_limits()
        seen["agent"] = True
    except LabVMError as e:
        seen["agent"] = "limits" in str(e)  # the key passed; the (empty) limits did not
    return seen


@settings(max_examples=400, deadline=None)
@given(_names)
@example("_bob")
@example("bob\n")
def test_every_part_accepts_exactly_the_same_root_keys(key: str) -> None:
    seen = _accepted_everywhere(key)
    assert len(set(seen.values())) == 1, (key, seen)


@settings(max_examples=300, deadline=None)
@given(_names)
def test_every_part_accepts_exactly_the_same_node_names(name: str) -> None:
    from traitlets import TraitError

    from labvm_spawner.cluster import Cluster
    from labvm_spawner.names import is_node_name
    from labvm_spawner.spawner import LabVMSpawner

    try:
        LabVMSpawner(node_name=name)
        spawner = True
    except TraitError:
        spawner = False
    try:
        Cluster("sqlite://").make_join_token(name, "t")
        cluster = True
    except LabVMError:
        cluster = False
    assert spawner == cluster == is_node_name(name), name
