"""The spawn page's progress events name LabVM's steps."""

import json

import pytest

pytestmark = pytest.mark.e2e


def test_progress_events_name_each_step(hub):
    hub.create_user("alice")
    r = hub.api("POST", "/users/alice/server", json={"gpus": 2})
    assert r.status_code == 202, r.text
    messages = []
    with hub.api("GET", "/users/alice/server/progress", stream=True) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                event = json.loads(line[5:])
                messages.append(event.get("message", ""))
                if event.get("ready") or event.get("failed"):
                    break
    text = "\n".join(messages)
    for step in ("Allocating GPUs", "Allocated GPU(s) 0, 1", "Mounting root filesystem",
                 "Starting container"):
        assert step in text, text
    assert "ready" in messages[-1].lower(), messages
