"""``labvm migrate USER NODE``: ask the admin service to move a user's server, and follow it.

It talks to the monitor service's admin API through the hub (the same checks as the
admin page): a hub API token of an admin, from --token or $JUPYTERHUB_API_TOKEN.
Exit status: 0 done (or accepted, with --no-wait), 1 refused or failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000/services/labvm-monitor/"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect means "log in first" (a missing or bad token): report it, do not follow
    # it to the hub's HTML login page.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def call(method: str, url: str, token: str, body: dict | None = None,
         timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of one API call; a body that is not JSON is {}."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with _opener.open(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        payload = json.loads(raw or b"{}")
    except ValueError:
        payload = {}
    return status, payload if isinstance(payload, dict) else {}


def _message(status: int, payload: dict[str, Any]) -> str:
    if 300 <= status < 400:
        return "the hub did not accept the token (log in required)"
    return str(payload.get("error") or payload.get("message") or f"HTTP {status}")


def follow(url: str, token: str, mid: int, poll_s: float = 1.0) -> int:
    """Print each new step of migration ``mid`` until it ends; 0 if done, 1 if failed."""
    last = None
    while True:
        status, m = call("GET", f"{url}api/admin/migrations/{mid}", token)
        if status != 200:
            print(f"labvm migrate: {_message(status, m)}", file=sys.stderr)
            return 1
        if m.get("step") != last:
            last = m.get("step")
            print(f"  {last}")
        if m.get("state") == "done":
            downtime = m.get("downtime_s")
            shown = f"{downtime:.1f} s" if downtime is not None else "none (not running)"
            print(f"migration {mid} done: {m['key']} is on node {m['target']}; "
                  f"downtime {shown}")
            return 0
        if m.get("state") == "failed":
            print(f"migration {mid} failed: {m.get('error')}", file=sys.stderr)
            return 1
        time.sleep(poll_s)


def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        print("labvm migrate: no hub API token: pass --token or set $JUPYTERHUB_API_TOKEN "
              "(an admin's token, e.g. from the hub's Token page)", file=sys.stderr)
        return 2
    url = args.url or os.environ.get("LABVM_ADMIN_URL") or DEFAULT_URL
    url = url if url.endswith("/") else url + "/"
    body = {"user": args.user, "server": args.server, "node": args.node}
    try:
        status, reply = call("POST", url + "api/admin/migrate", token, body)
        if status != 202:
            print(f"labvm migrate: {_message(status, reply)}", file=sys.stderr)
            return 1
        mid = int(reply["id"])
        print(f"migration {mid} accepted")
        if args.no_wait:
            return 0
        return follow(url, token, mid, args.poll)
    except OSError as e:  # URLError, a refused connection or a timeout
        print(f"labvm migrate: cannot reach {url}: {getattr(e, 'reason', e)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("labvm migrate: stopped following; the migration goes on in the service",
              file=sys.stderr)
        return 130


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", help="the user whose server moves")
    parser.add_argument("node", help="the node it moves to")
    parser.add_argument("--server", default="", help="a named server (default: the default one)")
    parser.add_argument("--no-wait", action="store_true",
                        help="print the migration's id and return; do not follow it")
    parser.add_argument("--url", default="",
                        help="the admin service's URL (default: $LABVM_ADMIN_URL or "
                        f"{DEFAULT_URL})")
    parser.add_argument("--token", default="",
                        help="an admin's hub API token (default: $JUPYTERHUB_API_TOKEN)")
    parser.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)
