"""Users' SSH public keys: what a key line may be (the store is ``keystore``).

A key comes from a user's browser and ends up in two places that must not be
tricked: the gateway's own key check, and the ``authorized_keys`` file the sshd in
the user's container reads. So a key is parsed with asyncssh, and only its type,
its base64 blob and a tame comment are kept; options (``command=``,
``permitopen=``), line breaks and anything else are refused at the boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import asyncssh

from ..errors import LabVMError

MAX_KEYS = 20  # per user
MIN_RSA_BITS = 2048
# What sshd accepts as a key type; certificates are not user keys.
KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
})
_LINE = re.compile(r"(?P<type>[a-z0-9@.-]{1,64}) (?P<blob>[A-Za-z0-9+/]{16,16384}={0,2})"
                   r"(?: (?P<comment>[^\x00-\x1f\x7f]{0,200}))?")
_COMMENT_BAD = re.compile(r"[^A-Za-z0-9@._+:=,()/ -]")


class BadKey(LabVMError):
    """A key line we refuse; the message says why, for the user."""


@dataclass(frozen=True)
class PublicKey:
    algorithm: str
    blob: str  # base64, as in an authorized_keys line
    comment: str
    fingerprint: str  # SHA256:..., as ssh-keygen -l prints it

    @property
    def line(self) -> str:
        """The key as one authorized_keys line, with no options."""
        return f"{self.algorithm} {self.blob}" + (f" {self.comment}" if self.comment else "")


def parse(text: object) -> PublicKey:
    """One public key from what a user pasted (an ``id_*.pub`` line)."""
    if not isinstance(text, str):
        raise BadKey("a key must be text: the one line of your id_ed25519.pub")
    text = text.strip()
    if text.startswith(("-----BEGIN", "PuTTY")) or "PRIVATE KEY" in text:
        raise BadKey("this is a private key or a PuTTY file: paste the public key, the "
                     "one line of your id_ed25519.pub (and keep the private one to yourself)")
    if "\n" in text or "\r" in text:
        raise BadKey("paste one key per line (this has several lines)")
    m = _LINE.fullmatch(text)
    if m is None:
        raise BadKey("this is not an OpenSSH public key line (it should look like "
                     "'ssh-ed25519 AAAA... you@laptop'; key options are not accepted)")
    if m["type"] not in KEY_TYPES:
        raise BadKey(f"keys of type {m['type'][:40]} are not accepted (use ssh-ed25519, "
                     "ecdsa or rsa of at least 2048 bits)")
    try:
        key = asyncssh.import_public_key(f"{m['type']} {m['blob']}")
    except (asyncssh.KeyImportError, ValueError) as e:
        raise BadKey(f"this key does not decode: {e}") from None
    if key.get_algorithm() != m["type"]:
        raise BadKey("the key's type does not match what its line says")
    if m["type"] == "ssh-rsa" and _rsa_bits(key) < MIN_RSA_BITS:
        raise BadKey(f"RSA keys need at least {MIN_RSA_BITS} bits")
    comment = _COMMENT_BAD.sub("_", (m["comment"] or "").strip())[:100]
    return PublicKey(m["type"], m["blob"], comment, key.get_fingerprint("sha256"))


def _rsa_bits(key: asyncssh.SSHKey) -> int:
    return int(getattr(key.pyca_key, "key_size", 0))


def authorized_keys(keys: list[PublicKey]) -> str:
    """The body of an ``authorized_keys`` file holding ``keys``."""
    return "".join(k.line + "\n" for k in keys)


def check_lines(lines: object) -> list[str]:
    """Key lines that crossed a wire (a start request, the agent's key route): each must
    parse again and come out the same, or the whole list is refused."""
    if not isinstance(lines, list) or len(lines) > MAX_KEYS:
        raise LabVMError(f"ssh_keys must be a list of at most {MAX_KEYS} key lines")
    out = []
    for line in lines:
        key = parse(line)
        if key.line != line:
            raise LabVMError("an ssh key line is not in its plain form")
        out.append(line)
    return out
