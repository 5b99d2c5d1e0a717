"""Run shell commands in a user's server the way the user does: through a Jupyter kernel.

The request goes through the hub's proxy to the user's Jupyter server, which runs
the command in a Python kernel inside the container (as the user, uid 1000).
"""

from __future__ import annotations

import json
import uuid

import requests
from websockets.sync.client import connect

# Every file in the user's home, with its checksum: what "nothing lost" is checked against.
MANIFEST = "cd ~ && find . -path ./.cache -prune -o -path ./.local -prune -o -path " \
    "./.ipython -prune -o -path ./.jupyter -prune -o -type f -print0 | sort -z | " \
    "xargs -0 sha256sum"

_CODE = """
import subprocess
_r = subprocess.run(["bash", "-c", {script!r}], capture_output=True, text=True)
print("LABVM-RC", _r.returncode)
print(_r.stdout + _r.stderr)
"""


def run(hub, user: str, script: str, timeout: float = 600, server: str = "") -> tuple[int, str]:
    prefix = f"/user/{user}/{server}/" if server else f"/user/{user}/"
    headers = {"Authorization": f"token {hub.token}"}
    r = requests.post(f"{hub.url}{prefix}api/kernels", headers=headers,
                      json={"name": "python3"}, timeout=60)
    assert r.status_code == 201, (r.status_code, r.text)
    kid = r.json()["id"]
    ws_url = hub.url.replace("http://", "ws://") + f"{prefix}api/kernels/{kid}/channels"
    msg_id = uuid.uuid4().hex
    request = {
        "header": {"msg_id": msg_id, "username": user, "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": _CODE.format(script=script), "silent": False,
                    "store_history": False, "user_expressions": {}, "allow_stdin": False,
                    "stop_on_error": True},
    }
    out: list[str] = []
    try:
        with connect(ws_url, additional_headers=headers, open_timeout=60,
                     max_size=None) as ws:
            ws.send(json.dumps(request))
            while True:
                msg = json.loads(ws.recv(timeout=timeout))
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["header"]["msg_type"]
                if kind == "stream":
                    out.append(msg["content"]["text"])
                elif kind == "error":
                    out.append("\n".join(msg["content"]["traceback"]))
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    break
    finally:
        requests.delete(f"{hub.url}{prefix}api/kernels/{kid}", headers=headers, timeout=60)
    text = "".join(out)
    first, _, rest = text.partition("\n")
    assert first.startswith("LABVM-RC "), text
    return int(first.split()[1]), rest
