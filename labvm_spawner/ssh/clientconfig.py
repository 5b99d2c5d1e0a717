"""What a user puts in their ``~/.ssh/config`` and ``known_hosts`` to reach their servers
through the gateway (shown ready to copy on their page, and in the README)."""

from __future__ import annotations


def host_alias(server: str) -> str:
    """The ``Host`` name of a server in the user's config: ``labvm``, ``labvm-NAME``."""
    return f"labvm-{server}" if server else "labvm"


def ssh_config(user: str, host: str, port: int, servers: list[str]) -> str:
    """One ``Host`` block per server (the default one first). The inner host key is
    named by hub, user and server, so it stays the same when the server moves node."""
    blocks = [f"# LabVM at {host}: ssh {host_alias('')}, scp/rsync {host_alias('')}:PATH, "
              "VS Code Remote-SSH host " + host_alias("")]
    for server in ["", *sorted(s for s in servers if s)]:
        blocks.append(
            f"Host {host_alias(server)}\n"
            f"    HostName {server or 'default'}\n"
            f"    User {user}\n"
            f"    ProxyJump {user}@{host}:{port}\n"
            f"    HostKeyAlias labvm.{host}.{user}.{server or 'default'}\n"
            "    ServerAliveInterval 30\n")
    return "\n".join(blocks)


def known_hosts_line(host: str, port: int, public_key: str) -> str:
    """The gateway's host key as a ``known_hosts`` line (``public_key``: type and base64)."""
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {public_key}"
