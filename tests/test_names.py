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
