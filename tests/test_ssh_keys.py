"""Users' SSH keys at the boundary: what a pasted line may be, and whose keys are whose."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labvm_spawner.errors import LabVMError
from labvm_spawner.ssh import clientconfig, keys
from labvm_spawner.ssh.keystore import KeyStore


@pytest.fixture(scope="module")
def pub(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("k")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f",
                    str(d / "id")], check=True)
    return (d / "id.pub").read_text()


def test_a_pasted_key_line_is_parsed_and_fingerprinted_like_ssh_keygen(pub, tmp_path) -> None:
    k = keys.parse(pub + "\n")
    (tmp_path / "k.pub").write_text(pub)
    want = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k.pub")],
                          capture_output=True, text=True, check=True).stdout.split()[1]
    assert k.fingerprint == want
    assert k.line == pub.strip()
    assert k.comment == "me@laptop"


@pytest.mark.parametrize("text, says", [
    ("", "not an OpenSSH public key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END", "private key"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK9VD8fCDBHhi8U3VQmpC+9BmCB52MY a\nb", "several lines"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
    ('command="rm -rf /" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK9VD8fCDBHhi8U3VQmpC+9BmCB52MY',
     "options are not accepted"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq",
     "not accepted"),
    ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQC", "does not decode"),
    (42, "must be text"),
])
def test_what_is_not_one_public_key_is_refused_with_a_reason(text, says) -> None:
    with pytest.raises(keys.BadKey, match=says):
        keys.parse(text)


def test_a_hostile_comment_cannot_add_a_line_or_an_option(pub) -> None:
    algo, blob = pub.split()[:2]
    with pytest.raises(keys.BadKey):
        keys.parse(f"{algo} {blob} x\nssh-ed25519 {blob} evil")
    k = keys.parse(f"{algo} {blob} a$(reboot)`b`;c")
    assert k.comment == "a_(reboot)_b__c" and keys.authorized_keys([k]).count("\n") == 1


def test_short_rsa_keys_are_refused(tmp_path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f",
                    str(tmp_path / "r")], check=True)
    with pytest.raises(keys.BadKey, match="2048"):
        keys.parse((tmp_path / "r.pub").read_text())


def test_key_lines_from_the_wire_must_be_plain(pub) -> None:
    line = keys.parse(pub).line
    assert keys.check_lines([line]) == [line]
    for bad in ([line + "  "], "not a list", [line] * (keys.MAX_KEYS + 1), [7]):
        with pytest.raises(LabVMError):
            keys.check_lines(bad)


def test_each_user_sees_and_deletes_only_their_own_keys(pub, tmp_path) -> None:
    store = KeyStore(f"sqlite:///{tmp_path}/k.sqlite")
    row = store.add("alice", pub)
    with pytest.raises(keys.BadKey, match="already registered"):
        store.add("alice", pub)
    assert store.keys("bob") == []
    assert store.delete("bob", row["id"]) is False
    assert [k.fingerprint for k in store.public_keys("alice")] == [row["fingerprint"]]
    assert store.delete("alice", row["id"]) is True
    assert store.keys("alice") == []


def test_a_deleted_accounts_keys_never_let_anyone_in_under_its_name(pub, tmp_path) -> None:
    from datetime import UTC, datetime, timedelta

    store = KeyStore(f"sqlite:///{tmp_path}/k.sqlite")
    for user in ("alice", "bob", "carol"):
        store.add(user, pub)
    now = datetime.now(UTC)
    # bob is gone; carol's name was given to a new account after her key was added; alice's
    # account dates from within the second her key was added (the key's time keeps whole
    # seconds): hers stays.
    fp = store.keys("alice")[0]["fingerprint"]
    gone = store.forget_departed({
        "alice": now.isoformat().replace("+00:00", "Z"),
        "carol": (now + timedelta(minutes=5)).isoformat(),
    })
    assert sorted(gone) == [("bob", fp), ("carol", fp)]
    assert [k.fingerprint for k in store.public_keys("alice")] == [fp]
    assert store.public_keys("bob") == [] and store.public_keys("carol") == []
    assert store.forget_departed({"alice": None}) == []


def test_the_ssh_config_block_names_each_server() -> None:
    assert clientconfig.ssh_config("alice", "hub.lab", 2222, ["gpu", ""]) == """\
# LabVM at hub.lab: ssh labvm, scp/rsync labvm:PATH, VS Code Remote-SSH host labvm
Host labvm
    HostName default
    User alice
    ProxyJump alice@hub.lab:2222
    HostKeyAlias labvm.hub.lab.alice.default
    ServerAliveInterval 30

Host labvm-gpu
    HostName gpu
    User alice
    ProxyJump alice@hub.lab:2222
    HostKeyAlias labvm.hub.lab.alice.gpu
    ServerAliveInterval 30
"""
    assert clientconfig.known_hosts_line("hub.lab", 2222, "ssh-ed25519 AAAA") == \
        "[hub.lab]:2222 ssh-ed25519 AAAA"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
       st.sampled_from(["", "ssh-ed25519 ", "ssh-rsa ", 'command="x" ssh-ed25519 ']))
def test_no_pasted_text_becomes_more_than_one_plain_key_line(text, prefix) -> None:
    """Whatever a user pastes, what is kept is one line of type, base64 and a tame comment,
    which parses again to the same key: never an option, a second line or a control byte."""
    try:
        k = keys.parse(prefix + text)
    except keys.BadKey:
        return
    assert k.algorithm in keys.KEY_TYPES
    assert keys.authorized_keys([k]).count("\n") == 1
    assert not any(ord(c) < 32 or ord(c) == 127 for c in k.line)
    assert keys.parse(k.line) == k


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80), st.integers(0, 200))
def test_a_real_key_with_anything_spliced_in_stays_one_plain_line(pub, extra, at) -> None:
    line = pub.strip()
    at = min(at, len(line))
    try:
        k = keys.parse(line[:at] + extra + line[at:])
    except keys.BadKey:
        return
    assert keys.authorized_keys([k]).count("\n") == 1
    assert not any(ord(c) < 32 or ord(c) == 127 for c in k.line)
    assert keys.parse(k.line) == k
