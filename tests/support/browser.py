"""Debian's chromium, driven by Playwright (``executable_path``), as the tests use it."""

from __future__ import annotations

from pathlib import Path

from .components import require

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def launch(playwright):  # noqa: ANN001, ANN201 - playwright's own types
    require(CHROMIUM.exists(), f"chromium at {CHROMIUM}")
    ARTIFACTS.mkdir(exist_ok=True)
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)


def log_in(context, base_url: str, user: str, password: str):  # noqa: ANN001, ANN201
    """A page of ``context`` logged in to the hub at ``base_url`` as ``user``."""
    page = context.new_page()
    page.goto(base_url + "/hub/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_url(lambda url: "/hub/login" not in url, timeout=30000)
    return page
