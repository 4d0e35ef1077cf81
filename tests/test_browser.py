"""The demo site in a real browser: headless Chromium (Debian's) driven by Playwright, against uvicorn.

Skipped with the reason where Chromium or Playwright is missing, except in CI (CI=true), where that fails.
A failing test leaves a screenshot of the page under its temporary folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        _missing("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


class Demo:
    """The demo served by a real uvicorn on loopback, which a test may restart."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = str(tmp_path / "demo.db")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.demo.app:app", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning"],
            cwd=ROOT, env={**os.environ, "DEMO_DB": self.db}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/session", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        pytest.fail("the demo did not start")

    def stop(self) -> None:
        if self.server is not None:
            self.server.send_signal(signal.SIGINT)
            self.server.wait(timeout=30)
            self.server = None


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    site = Demo(tmp_path)
    site.start()
    yield site
    site.stop()


@pytest.fixture
def context(browser: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    ctx = browser.new_context()
    yield ctx
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for i, page in enumerate(ctx.pages):
            page.screenshot(path=str(tmp_path / f"failure-{i}.png"))
    ctx.close()


def session_cookie(ctx: Any) -> dict[str, Any]:
    (cookie,) = [c for c in ctx.cookies() if c["name"] == "session"]
    return cookie  # type: ignore[no-any-return]


def log_in(page: Any, demo: Demo, name: str, remember: bool = False) -> None:
    page.goto(demo.url + "/login")
    page.fill("#username", name)
    page.fill("#password", "correct horse")
    if remember:
        page.check("#remember")
    page.click("#submit")
    page.wait_for_selector("#user")


def test_the_counter_goes_up_and_survives_a_restart(demo: Demo, context: Any) -> None:
    page = context.new_page()
    for expected in ("1", "2", "3"):
        page.goto(demo.url + "/")
        assert page.inner_text("#visits") == expected
    demo.stop()
    demo.start()
    page.goto(demo.url + "/")
    assert page.inner_text("#visits") == "4"


def test_the_session_cookie_is_httponly_lax_and_scoped_to_the_site(demo: Demo, context: Any) -> None:
    page = context.new_page()
    page.goto(demo.url + "/")
    assert "session=" not in page.evaluate("document.cookie")  # HttpOnly: scripts cannot read it
    cookie = session_cookie(context)
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax" and cookie["path"] == "/"


def test_login_renews_the_token_keeps_the_cart_and_logout_ends_it(demo: Demo, browser: Any, context: Any) -> None:
    page = context.new_page()
    page.goto(demo.url + "/")
    page.fill("#item", "apple")
    page.click("#add")
    page.wait_for_selector("#cart li:text('apple')")
    before = session_cookie(context)["value"]
    log_in(page, demo, "ada")
    after = session_cookie(context)["value"]
    assert after != before
    assert page.inner_text("#cart") == "apple"  # the data moved to the new token
    assert "user" in page.goto(demo.url + "/session").text()

    thief = browser.new_context()  # the old token, replayed from another browser, finds nothing
    thief.add_cookies([{"name": "session", "value": before, "url": demo.url}])
    stolen = thief.new_page()
    stolen.goto(demo.url + "/session")
    assert "user" not in stolen.inner_text("#keys") and "cart" not in stolen.inner_text("#keys")
    thief.close()

    page.goto(demo.url + "/")
    page.click("#logout")
    page.wait_for_selector("#login-link")
    assert all(c["value"] != after for c in context.cookies() if c["name"] == "session")
    page.goto(demo.url + "/session")
    assert "user" not in page.inner_text("#keys")


def test_two_browsers_never_see_each_others_data(demo: Demo, browser: Any) -> None:
    first, second = browser.new_context(), browser.new_context()
    try:
        a, b = first.new_page(), second.new_page()
        a.goto(demo.url + "/")
        a.fill("#item", "only-in-a")
        a.click("#add")
        a.wait_for_selector("#cart li:text('only-in-a')")
        log_in(a, demo, "grace")
        b.goto(demo.url + "/")
        assert "only-in-a" not in b.inner_text("#cart") and b.locator("#user").count() == 0
        assert b.inner_text("#visits") == "1"
    finally:
        first.close()
        second.close()


def test_remember_me_decides_between_a_browser_session_and_a_persistent_cookie(demo: Demo, browser: Any) -> None:
    for remember in (False, True):
        ctx = browser.new_context()
        try:
            page = ctx.new_page()
            log_in(page, demo, f"user-{remember}", remember=remember)
            expires = session_cookie(ctx)["expires"]
            if remember:
                assert expires > time.time() + 13 * 24 * 3600
            else:
                assert expires == -1  # a browser-session cookie
        finally:
            ctx.close()


def test_a_form_without_its_csrf_token_is_refused(demo: Demo) -> None:
    with httpx.Client(base_url=demo.url) as client:
        client.get("/")
        assert client.post("/cart", data={"item": "forged"}).status_code == 403
        assert client.post("/logout").status_code == 403
