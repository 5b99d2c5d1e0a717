"""Checks the shipped JupyterHub configuration runs at its end (``jupyterhub_config.py``)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

from .errors import LabVMError

ALLOW_PLAIN_HTTP = "LABVM_ALLOW_PLAIN_HTTP"


def require_tls(c: Any) -> None:
    """Refuse to serve the hub in clear on anything but loopback.

    Log-in passwords and the nodes' join tokens travel to the hub's public URL. Set
    ``c.JupyterHub.ssl_cert``/``ssl_key``, or put a TLS proxy in front and bind to
    loopback, or say so explicitly with ``LABVM_ALLOW_PLAIN_HTTP=1``.
    """
    jh = c.JupyterHub
    url = jh.bind_url if "bind_url" in jh else "http://:8000"
    host = urlsplit(url).hostname or ""
    if "ssl_cert" in jh and jh.ssl_cert or os.environ.get(ALLOW_PLAIN_HTTP) == "1":
        return
    if _loopback(host):
        return
    raise LabVMError(
        f"JupyterHub would serve {url} without TLS, so passwords and join tokens would "
        "cross the network in clear. Set c.JupyterHub.ssl_cert and ssl_key, or bind to "
        f"127.0.0.1 behind a TLS proxy, or set {ALLOW_PLAIN_HTTP}=1 if you must.")


def _loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (all addresses) or a name: not loopback
