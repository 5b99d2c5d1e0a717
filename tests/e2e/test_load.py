"""Many users start at once (a group meeting has just ended): LABVM_LOAD_USERS, default 10.

Each asks for one of the node's 8 (fake) GPUs, so some must be refused. Every start
either gives a server with GPUs nobody else holds, or a sentence that says why and to
try again; refused starts leave nothing behind, and one user's progress page keeps
moving while the others start.
"""

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.helpers import container_of, mounts_under, state_dir
from support.hubharness import HubError

pytestmark = pytest.mark.e2e

USERS = int(os.environ.get("LABVM_LOAD_USERS", "10"))
GPUS = 8  # tests/conftest.py fake_gpu_dev; tests/fixtures/nvml_dgx_a100.json


def visible_gpus(container) -> set[str]:
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"] if "=" in e)
    return set(filter(None, env.get("NVIDIA_VISIBLE_DEVICES", "").split(",")))


def watch_progress(hub, user: str, into: list) -> None:
    with hub.api("GET", f"/users/{user}/server/progress", stream=True) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                event = json.loads(line[5:])
                into.append(event)
                if event.get("ready") or event.get("failed"):
                    return


def test_ten_users_start_at_once(hub, docker_client):
    hub.poll_interval = 0.25  # ten pollers at once
    users = [f"load{i}" for i in range(USERS)]
    for u in users:
        hub.create_user(u)

    def start(user: str) -> str | None:
        try:
            hub.spawn(user, {"gpus": 1}, timeout=300)
        except HubError as e:
            return str(e)
        return None

    # The first user's progress stream, read while all of them start.
    events: list[dict] = []
    first = users[0]
    r = hub.api("POST", f"/users/{first}/server", json={"gpus": 1})
    assert r.status_code in (201, 202), r.text
    watcher = threading.Thread(target=watch_progress, args=(hub, first, events))
    watcher.start()
    with ThreadPoolExecutor(max_workers=USERS) as pool:
        results = dict(zip(users[1:], pool.map(start, users[1:]), strict=True))
    watcher.join(timeout=300)
    assert not watcher.is_alive()
    results[first] = None if events and events[-1].get("ready") else \
        events[-1].get("message", "") if events else "no progress events"

    messages = [e.get("message", "") for e in events]
    assert any("Allocating GPUs" in m for m in messages), messages
    assert any("Mounting root filesystem" in m for m in messages), messages

    ready = [u for u, err in results.items() if err is None]
    refused = {u: err for u, err in results.items() if err is not None}
    assert len(ready) == min(USERS, GPUS), refused
    for u, err in refused.items():
        assert "Internal Server Error" not in err, err
        first_line = err.split("--- hub log ---")[0]
        assert re.search(r"GPU", first_line), first_line
        assert re.search(r"try again|free|requested", first_line), first_line
        # A refused start holds nothing: no container, no root mount.
        assert container_of(docker_client, u) is None
        assert mounts_under(state_dir(hub) / "mnt" / u) == []

    # No GPU is given twice, and each server sees exactly one.
    seen: dict[str, str] = {}
    for u in ready:
        gpus = visible_gpus(container_of(docker_client, u))
        assert len(gpus) == 1, (u, gpus)
        (uuid,) = gpus
        assert uuid not in seen, f"{uuid} given to both {seen.get(uuid)} and {u}"
        seen[uuid] = u
    for u in ready:
        assert hub.server_get(u, "api/status", token=hub.user_token(u)).ok

    # All stop at once; nothing is left, and every GPU is free again.
    with ThreadPoolExecutor(max_workers=USERS) as pool:
        list(pool.map(lambda u: hub.unspawn(u, timeout=180), ready))
    for u in users:
        assert container_of(docker_client, u) is None
    assert mounts_under(state_dir(hub) / "mnt") == []
    hub.spawn(users[-1], {"gpus": GPUS}, timeout=300)
    assert len(visible_gpus(container_of(docker_client, users[-1]))) == GPUS
