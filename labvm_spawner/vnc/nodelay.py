"""TCP_NODELAY on jupyter-server-proxy's websockets, for an interactive desktop.

Tornado leaves Nagle's algorithm on for a websocket unless the handler asks. websockify
relays one framebuffer update as several websocket messages, so with Nagle on, each
small message after the first waits for the browser's delayed ACK (about 40 ms): the
desktop ran at half its frame rate through the proxy. Browsers and CHP already send
without delay; this makes the Jupyter server's side do the same.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def enable_nodelay() -> None:
    """Make every proxied websocket of jupyter-server-proxy send without delay (idempotent)."""
    try:
        from jupyter_server_proxy.handlers import SuperviseAndProxyHandler
    except ImportError:  # not in a Jupyter server with the proxy: nothing to tune
        return
    if getattr(SuperviseAndProxyHandler, "_labvm_nodelay", False):
        return
    original = SuperviseAndProxyHandler.open

    async def open(self, *args, **kwargs):
        try:
            self.set_nodelay(True)
        except Exception:  # noqa: BLE001 - a tuning step must never break the proxy
            log.warning("could not set TCP_NODELAY on a proxied websocket", exc_info=True)
        return await original(self, *args, **kwargs)

    SuperviseAndProxyHandler.open = open
    SuperviseAndProxyHandler._labvm_nodelay = True
