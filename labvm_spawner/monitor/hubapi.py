"""The few hub REST API calls the service makes, with the service's own token."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest


class HubApi:
    def __init__(self, api_url: str | None = None, token: str | None = None) -> None:
        self.api_url = (api_url or os.environ.get("JUPYTERHUB_API_URL", "")).rstrip("/")
        self.token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")

    async def _call(self, method: str, path: str, body: Any = None,
                    headers: dict[str, str] | None = None) -> Any:
        req = HTTPRequest(
            self.api_url + path, method=method,
            headers={"Authorization": f"token {self.token}", **(headers or {})},
            body=None if body is None and method in ("GET", "DELETE") else json.dumps(body or {}),
            allow_nonstandard_methods=True, request_timeout=30,
        )
        resp = await AsyncHTTPClient().fetch(req, raise_error=True)
        return json.loads(resp.body) if resp.body else None

    async def users(self) -> list[dict[str, Any]]:
        """Every user, page by page (a single answer stops at the hub's api_page_max_limit)."""
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            # include_stopped_servers so a stopped named server still shows its root
            page = await self._call(
                "GET", f"/users?include_stopped_servers=1&offset={offset}",
                headers={"Accept": "application/jupyterhub-pagination+json"}) or {}
            if isinstance(page, list):  # a hub from before pagination
                return page
            found += page.get("items") or []
            nxt = (page.get("_pagination") or {}).get("next")
            if not nxt or not page.get("items"):
                return found
            offset = int(nxt["offset"])

    async def stop_server(self, user: str, server: str = "") -> None:
        path = f"/users/{quote(user)}/server" if not server else \
            f"/users/{quote(user)}/servers/{quote(server)}"
        await self._call("DELETE", path)

    async def user(self, name: str) -> dict[str, Any] | None:
        """The user's model (with stopped servers), or None if the hub has no such user."""
        try:
            return await self._call("GET", f"/users/{quote(name)}?include_stopped_servers=1")
        except HTTPClientError as e:
            if e.code == 404:
                return None
            raise

    async def start_server(self, user: str, server: str = "",
                           options: dict[str, Any] | None = None) -> None:
        path = f"/users/{quote(user)}/server" if not server else \
            f"/users/{quote(user)}/servers/{quote(server)}"
        await self._call("POST", path, options or {})

    async def progress(self, user: str, server: str = "") -> AsyncIterator[dict[str, Any]]:
        """The start's progress events ({progress, message, ready?, failed?}) as the hub
        sends them, until the stream ends."""
        path = f"/users/{quote(user)}/server/progress" if not server else \
            f"/users/{quote(user)}/servers/{quote(server)}/progress"
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        buf = b""

        def chunk(data: bytes) -> None:
            nonlocal buf
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.splitlines():
                    if line.startswith(b"data:"):
                        try:
                            queue.put_nowait(json.loads(line[5:]))
                        except ValueError:
                            pass

        req = HTTPRequest(self.api_url + path, headers={"Authorization": f"token {self.token}"},
                          streaming_callback=chunk, request_timeout=3600)

        async def fetch() -> None:
            try:
                await AsyncHTTPClient().fetch(req, raise_error=False)
            finally:
                queue.put_nowait(None)

        task = asyncio.ensure_future(fetch())
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            task.cancel()
