"""The demo's "your sessions" page in headless Chromium, with two browsers signed in as one user."""

from __future__ import annotations

from typing import Any

import test_browser
from test_browser import Demo, log_in

browser = test_browser.browser  # the fixtures: Chromium, the demo under uvicorn
demo = test_browser.demo


def signed_in(browser: Any, demo: Demo, agent: str) -> tuple[Any, Any]:
    ctx = browser.new_context(user_agent=agent)
    page = ctx.new_page()
    log_in(page, demo, "ada")
    return ctx, page


def rows(page: Any, demo: Demo) -> list[dict[str, Any]]:
    """The rows of the "your sessions" page, freshly loaded."""
    page.goto(demo.url + "/sessions")
    return page.eval_on_selector_all("tr.session", """rows => rows.map(r => ({
        id: r.dataset.id, current: r.classList.contains('current'),
        browser: r.querySelector('.browser').innerText, created: r.querySelector('.created').innerText,
        last_active: r.querySelector('.last-active').innerText}))""")


def test_ending_the_other_browsers_session_logs_it_out(demo: Demo, browser: Any) -> None:
    first, a = signed_in(browser, demo, "Browser One")
    second, b = signed_in(browser, demo, "Browser Two")
    try:
        listed = rows(a, demo)
        assert len(listed) == 2
        mine, other = sorted(listed, key=lambda r: not r["current"])
        assert mine["current"] and "Browser One" in mine["browser"] and "(this browser)" in mine["browser"]
        assert not other["current"] and other["browser"] == "Browser Two"
        assert all(r["created"].endswith("UTC") and r["last_active"].endswith("UTC") for r in listed)
        a.click(f"tr[data-id='{other['id']}'] button.end")
        a.wait_for_selector("#ended")
        assert a.inner_text("#ended") == "Ended 1 session."
        assert [r["browser"] for r in rows(a, demo)] == ["Browser One (this browser)"]

        b.goto(demo.url + "/")  # the other browser is logged out
        b.wait_for_selector("#login-link")
        assert b.locator("#user").count() == 0
        a.goto(demo.url + "/")
        assert a.locator("#user").count() == 1  # the first is not
    finally:
        first.close()
        second.close()


def test_end_all_other_sessions_keeps_only_this_browser(demo: Demo, browser: Any) -> None:
    contexts = [signed_in(browser, demo, f"Browser {n}") for n in ("One", "Two", "Three")]
    try:
        (_, a), (_, b), (_, c) = contexts
        assert len(rows(a, demo)) == 3
        a.click("#end-others")
        a.wait_for_selector("#ended")
        assert a.inner_text("#ended") == "Ended 2 sessions."
        for page in (b, c):
            page.goto(demo.url + "/")
            page.wait_for_selector("#login-link")
        assert [r["current"] for r in rows(a, demo)] == [True]
        a.click("tr.current button.end")  # its own row: a logout
        a.wait_for_selector("#login-link")
        a.goto(demo.url + "/sessions")
        a.wait_for_selector("#username")  # signed out: the page sends to the login form
    finally:
        for ctx, _ in contexts:
            ctx.close()
