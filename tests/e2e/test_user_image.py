"""The user image's single-user server, as each start imports it.

jsonschema imports rfc3987-syntax whenever it is installed, and that compiles some 35
Lark parsers: a second of CPU in every server's start. The image leaves it out; the
formats Jupyter's own schemas use are still checked.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

PROBE = r"""
import sys
import jupyterhub.singleuser  # what each start imports first
from jsonschema import Draft7Validator, ValidationError
slow = sorted(m for m in sys.modules if m.split(".")[0] in ("rfc3987_syntax", "lark"))
print("slow:" + ",".join(slow))
v = Draft7Validator({"type": "string", "format": "uri"},
                    format_checker=Draft7Validator.FORMAT_CHECKER)
try:
    v.validate("not a uri at all")
    print("uri:unchecked")
except ValidationError:
    print("uri:checked")
"""


def test_the_single_user_server_imports_no_parser_generator(docker_client, labvm_image):
    out = docker_client.containers.run(labvm_image, ["python3", "-c", PROBE], remove=True,
                                       network_mode="none").decode()
    assert "slow:\n" in out, out  # neither rfc3987_syntax nor lark was imported
    assert "uri:checked" in out, out  # jupyter-events' schemas (uri formats) still checked
