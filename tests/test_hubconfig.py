"""The shipped config refuses to serve log-ins in clear beyond loopback."""

from __future__ import annotations

import pytest
from traitlets.config import Config

from labvm_spawner.errors import LabVMError
from labvm_spawner.hubconfig import require_tls


def config(**jupyterhub) -> Config:
    c = Config()
    for k, v in jupyterhub.items():
        setattr(c.JupyterHub, k, v)
    return c


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000",
                                 "http://[::1]:8000"])
def test_loopback_needs_no_tls(url, monkeypatch) -> None:
    monkeypatch.delenv("LABVM_ALLOW_PLAIN_HTTP", raising=False)
    require_tls(config(bind_url=url))


@pytest.mark.parametrize("url", ["http://0.0.0.0:8000", "http://10.1.2.3:8000",
                                 "http://hub.lab.example:80", "http://:8000"])
def test_other_addresses_need_tls_or_an_explicit_yes(url, monkeypatch) -> None:
    monkeypatch.delenv("LABVM_ALLOW_PLAIN_HTTP", raising=False)
    with pytest.raises(LabVMError, match="without TLS"):
        require_tls(config(bind_url=url))
    require_tls(config(bind_url=url, ssl_cert="/etc/labvm/hub.crt",
                       ssl_key="/etc/labvm/hub.key"))
    monkeypatch.setenv("LABVM_ALLOW_PLAIN_HTTP", "1")
    require_tls(config(bind_url=url))
