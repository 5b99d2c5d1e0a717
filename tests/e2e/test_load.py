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
import time
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

    if USERS > (os.cpu_count() or 1):  # more starts than start slots: some waited
        assert "Waiting for other starts on node" in hub.log_path.read_text()
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


def _wait_for_step(hub, user: str, step: str) -> None:
    with hub.api("GET", f"/users/{user}/server/progress", stream=True) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if step in line:
                return
            if '"failed": true' in line or '"ready": true' in line:
                raise AssertionError(f"{user}: start ended before {step!r}: {line}")
    raise AssertionError(f"{user}: no {step!r} in the progress stream")


def test_hub_killed_with_servers_running_and_starting(hub, docker_client):
    """kill -9 of the hub while servers run and one more start than the node boots at once
    is under way, so one waits for a boot slot with its container made. After it comes
    back, the running ones are the same servers with their files, and the starting ones
    either run or left nothing; either way they start again, with GPUs nobody else holds."""
    hub.poll_interval = 0.25
    # One more start than the node boots at once (one per CPU), so one waits for a slot.
    starting = [f"late{i}" for i in range((os.cpu_count() or 1) + 1)]
    running = [f"run{i}" for i in range(max(USERS - len(starting), 1))]
    for u in running + starting:
        hub.create_user(u)
    with ThreadPoolExecutor(max_workers=len(running)) as pool:
        list(pool.map(lambda u: hub.spawn(u, timeout=300), running))
    before = {}
    for u in running:
        text = f"{u} wrote this before the hub died\n"
        r = hub.server_put(u, "api/contents/notes.txt",
                           {"type": "file", "format": "text", "content": text})
        assert r.status_code in (200, 201), r.text
        before[u] = (container_of(docker_client, u).id, text)
    for u in starting:
        r = hub.api("POST", f"/users/{u}/server", json={"gpus": 1})
        assert r.status_code in (201, 202), r.text
    for u in starting:
        _wait_for_step(hub, u, "Mounting root filesystem")
    deadline = time.monotonic() + 60
    while not re.search(r"late\d: Waiting for other starts", hub.log_path.read_text()):
        assert time.monotonic() < deadline, "no start waited for a boot slot"
        time.sleep(0.1)
    hub.stop(kill=True)
    hub.start()

    for u, (cid, text) in before.items():
        model = hub.api("GET", f"/users/{u}").json()
        assert model["servers"][""]["ready"], model
        assert container_of(docker_client, u).id == cid
        r = hub.server_get(u, "api/contents/notes.txt")
        assert r.ok and r.json()["content"] == text, r.text
    # The cut-short starts settle: a server that runs, or nothing at all.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        settled = []
        for u in starting:
            srv = hub.api("GET", f"/users/{u}").json()["servers"].get("")
            c = container_of(docker_client, u)
            mounted = mounts_under(state_dir(hub) / "mnt" / u)
            settled.append((srv and srv.get("ready") and c is not None) or
                           (not srv and c is None and not mounted))
        if all(settled):
            break
        time.sleep(0.5)
    assert all(settled), settled
    for u in starting:
        if not hub.api("GET", f"/users/{u}").json()["servers"]:
            hub.spawn(u, {"gpus": 1}, timeout=300)
    gpus = [visible_gpus(container_of(docker_client, u)) for u in starting]
    assert all(len(g) == 1 for g in gpus) and len(set().union(*gpus)) == len(starting), gpus
    with ThreadPoolExecutor(max_workers=USERS) as pool:
        list(pool.map(lambda u: hub.unspawn(u, timeout=180), running + starting))
    assert mounts_under(state_dir(hub) / "mnt") == []
