"""The web client, used as a person would: a real headless Chromium (Debian's `chromium`, which
`make chromium` installs) driven by Playwright, against the service on a real port. Every wait
is one of Playwright's auto-waiting expectations or an awaited browser event, never a sleep.

`TASKD_WEB_SCREENSHOT=docs/screenshot.png pytest tests/test_web.py -k main_screen` redraws the
README's picture."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, BrowserContext, Locator, Page, async_playwright, expect

from taskd.app import create_app
from tests.conftest import (
    PASSWORD,
    ClientFactory,
    SettingsFactory,
    User,
    UserFactory,
    register_and_login,
)
from tests.replicas import RECOVERY, Replica

Client = TestClient[web.Request, web.Application]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIVE_MS = 10_000  # bounds on a wait, not goals: a live update shows within a second
RESTART_MS = RECOVERY * 1000
SCREENSHOT = os.environ.get("TASKD_WEB_SCREENSHOT")
XSS = "<img src=x onerror=alert(1)>"
PAGE_SIZE = 50  # the client's (main.js)

expect.set_options(timeout=LIVE_MS)


@dataclass
class Tab:
    """A page in its own browser context (its own storage: another browser, as far as the
    service can tell), with what it must never do recorded."""

    context: BrowserContext
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, CSP violations

    def task(self, title: str) -> Locator:
        """The list item of the task with this title."""
        return self.page.get_by_role("listitem").filter(has=self.done_box(title))

    def done_box(self, title: str) -> Locator:
        return self.page.get_by_role("checkbox", name=title, exact=True)

    def button(self, name: str) -> Locator:
        return self.page.get_by_role("button", name=name, exact=True)

    @property
    def live(self) -> Locator:
        return self.page.locator("#live")

    async def log_in(self, username: str, password: str = PASSWORD) -> None:
        form = self.page.get_by_role("form", name="Log in")
        await form.get_by_label("Username").fill(username)
        await form.get_by_label("Password").fill(password)
        await form.get_by_role("button", name="Log in").click()

    async def logged_in(self, username: str) -> None:
        """The task screen, its stream open."""
        await expect(self.button("Log out")).to_be_visible()
        await expect(self.page.locator("#whoami")).to_have_text(username)
        await expect(self.live).to_have_text("Live updates on")

    async def add(self, title: str, description: str = "") -> None:
        await self.page.get_by_label("Title").fill(title)
        await self.page.get_by_label("Description").fill(description)
        await self.button("Add").click()
        await expect(self.done_box(title)).to_be_visible()

    def clean(self) -> None:
        assert self.dialogs == []
        assert self.errors == []


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium: Playwright never downloads a browser of its own."""
    assert CHROMIUM.exists(), f"no {CHROMIUM}: run `make chromium` (or apt-get install chromium)"
    return str(CHROMIUM)


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def open_tab(browser: Browser) -> AsyncIterator[Any]:
    """`await open_tab(url)`: a new context and page on the web client at `url`."""
    tabs: list[Tab] = []

    async def open_(url: str, **options: Any) -> Tab:
        context = await browser.new_context(**options)
        context.set_default_timeout(LIVE_MS)
        tab = Tab(context, await context.new_page())
        tabs.append(tab)

        async def dialog(d: Any) -> None:
            tab.dialogs.append(d.message)
            await d.dismiss()

        tab.page.on("dialog", dialog)
        tab.page.on("pageerror", lambda exc: tab.errors.append(f"page error: {exc}"))
        tab.page.on(
            "console",
            lambda m: tab.errors.append(m.text) if "Content Security Policy" in m.text else None,
        )
        await tab.page.goto(url)
        return tab

    yield open_
    for tab in tabs:
        await tab.context.close()
        tab.clean()


def url_of(client: Client) -> str:
    return str(client.make_url("/"))


async def test_page_and_files_carry_a_strict_policy(client: Client) -> None:
    for path, kind in (("/", "text/html"), ("/static/main.js", "text/javascript")):
        async with client.get(path) as resp:
            assert resp.status == 200
            assert resp.content_type == kind
            csp = resp.headers["Content-Security-Policy"]
            for directive in (
                "default-src 'self'",
                "script-src 'self'",
                "style-src 'self'",
                "connect-src 'self'",
                "frame-ancestors 'none'",
                "base-uri 'none'",
                "object-src 'none'",
            ):
                assert directive in csp.split("; "), (path, csp)
            assert "unsafe" not in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert resp.headers["Cache-Control"] == "no-cache"
            etag = resp.headers["ETag"]
        async with client.get(path, headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
    for missing in ("/static/nope.js", "/static/..%2Fapp.py", "/index.html"):
        async with client.get(missing) as resp:
            assert resp.status == 404, missing
            assert await resp.json() == {"detail": "Not found.", "code": "not_found"}


async def test_register_log_out_and_log_in_through_the_forms(
    client: Client, make_user: UserFactory, open_tab: Any
) -> None:
    await make_user("taken")
    tab = await open_tab(url_of(client))
    page = tab.page
    register = page.get_by_role("form", name="New here? Create an account")

    # API errors show next to the field they are about.
    await register.get_by_label("Username").fill("Taken")
    await register.get_by_label("Password").fill("12345678")
    await register.get_by_role("button", name="Register").click()
    await expect(page.locator("#register-password-error")).to_contain_text("numeric")
    await register.get_by_label("Password").fill(PASSWORD)
    await register.get_by_role("button", name="Register").click()
    await expect(page.locator("#register-username-error")).to_contain_text("already exists")
    await expect(register.get_by_label("Username")).to_be_focused()

    await register.get_by_label("Username").fill("carol")
    await register.get_by_label("Email").fill("carol@example.com")
    await register.get_by_role("button", name="Register").click()
    await tab.logged_in("carol")

    await page.reload()  # the login survives a reload
    await tab.logged_in("carol")

    await tab.button("Log out").click()
    await expect(page.get_by_role("form", name="Log in")).to_be_visible()
    await expect(tab.live).to_be_hidden()
    await tab.log_in("carol", "not the password")
    await expect(page.locator("#login-form-error")).to_have_text(
        "No active account found with the given credentials."
    )
    await tab.log_in("carol")
    await tab.logged_in("carol")

    # A second tab of the same browser shares the login, and the logging out.
    other = Tab(tab.context, await tab.context.new_page())
    await other.page.goto(url_of(client))
    await other.logged_in("carol")
    await tab.button("Log out").click()
    await expect(other.page.locator("#auth-notice")).to_have_text("You logged out in another tab.")
    await expect(other.page.get_by_role("form", name="Log in")).to_be_visible()


async def test_add_edit_tick_and_delete(client: Client, alice: User, open_tab: Any) -> None:
    tab = await open_tab(url_of(client))
    page = tab.page
    await tab.log_in("alice")
    await tab.logged_in("alice")
    await expect(page.locator("#list-status")).to_have_text("No tasks yet. Add one above.")

    # By keyboard: Enter in the title adds the task; an empty title is refused next to it.
    await page.get_by_label("Title").press("Enter")
    await expect(page.locator("#add-title-error")).to_have_text("Give the task a title.")
    await page.get_by_label("Title").fill("Buy milk")
    await page.get_by_label("Title").press("Enter")
    await expect(tab.done_box("Buy milk")).to_be_visible()
    await expect(page.locator("#add-title-error")).to_be_empty()
    await tab.add("Call the bank", "before noon")
    await expect(page.get_by_role("listitem")).to_have_count(2)
    await expect(page.get_by_role("listitem").first).to_contain_text("Call the bank")

    await tab.task("Buy milk").get_by_role("button", name="Edit").click()
    item = page.get_by_role("form", name="Edit Buy milk")
    await expect(item.get_by_label("Title")).to_be_focused()
    await item.get_by_label("Title").fill("Buy oat milk")
    await item.get_by_label("Description").fill("two cartons")
    await item.get_by_role("button", name="Save").click()
    item = tab.task("Buy oat milk")
    await expect(item).to_contain_text("two cartons")

    await tab.done_box("Buy oat milk").check()
    await expect(tab.done_box("Buy oat milk")).to_be_checked()

    _, body, _ = await alice.call("GET", "/api/tasks/?ordering=id")
    first, second = body["results"]
    assert (first["title"], first["description"], first["done"]) == (
        "Buy oat milk",
        "two cartons",
        True,
    )
    assert (second["title"], second["description"], second["done"]) == (
        "Call the bank",
        "before noon",
        False,
    )

    await page.get_by_label("Show").select_option("Open")
    await expect(page.get_by_role("listitem")).to_have_count(1)
    await page.get_by_label("Show").select_option("All")
    await page.get_by_label("Search").fill("OAT")
    await expect(page.get_by_role("listitem")).to_have_count(1)
    await expect(tab.done_box("Buy oat milk")).to_be_visible()
    await page.get_by_label("Search").fill("")
    await expect(page.get_by_role("listitem")).to_have_count(2)

    await tab.task("Buy oat milk").get_by_role("button", name="Delete").click()
    await expect(tab.done_box("Buy oat milk")).to_have_count(0)
    await expect(page.get_by_role("listitem")).to_have_count(1)
    _, body, _ = await alice.call("GET", "/api/tasks/")
    assert [task["title"] for task in body["results"]] == ["Call the bank"]


async def test_two_browsers_of_one_user_see_each_others_changes_live(
    client: Client, alice: User, open_tab: Any
) -> None:
    one = await open_tab(url_of(client))
    two = await open_tab(url_of(client))
    for tab in (one, two):
        await tab.log_in("alice")
        await tab.logged_in("alice")

    await one.add("Water the plants")
    await expect(two.done_box("Water the plants")).to_be_visible()

    await two.done_box("Water the plants").check()
    await expect(one.done_box("Water the plants")).to_be_checked()

    await one.task("Water the plants").get_by_role("button", name="Edit").click()
    item = one.page.get_by_role("form", name="Edit Water the plants")
    await item.get_by_label("Title").fill("Water the ferns")
    await item.get_by_role("button", name="Save").click()
    await expect(two.done_box("Water the ferns")).to_be_checked()

    await two.task("Water the ferns").get_by_role("button", name="Delete").click()
    await expect(one.page.get_by_role("listitem")).to_have_count(0)


async def test_a_task_changed_over_plain_http_shows_in_the_page(
    client: Client, alice: User, open_tab: Any
) -> None:
    tab = await open_tab(url_of(client))
    await tab.log_in("alice")
    await tab.logged_in("alice")

    task = await alice.create_task("From curl", description="made elsewhere")
    await expect(tab.task("From curl")).to_contain_text("made elsewhere")
    status, _, _ = await alice.call(
        "PATCH", f"/api/tasks/{task['id']}/", {"title": "From curl, renamed", "done": True}
    )
    assert status == 200
    await expect(tab.done_box("From curl, renamed")).to_be_checked()
    status, _, _ = await alice.call("DELETE", f"/api/tasks/{task['id']}/")
    assert status == 204
    await expect(tab.page.get_by_role("listitem")).to_have_count(0)


async def test_a_long_list_is_read_a_page_at_a_time(
    client: Client, alice: User, open_tab: Any
) -> None:
    for n in range(PAGE_SIZE + 2):
        await alice.create_task(f"Task {n:02}")
    tab = await open_tab(url_of(client))
    await tab.log_in("alice")
    await tab.logged_in("alice")
    items = tab.page.get_by_role("listitem")
    await expect(items).to_have_count(PAGE_SIZE)
    await expect(items.first).to_contain_text(f"Task {PAGE_SIZE + 1:02}")
    await expect(tab.done_box("Task 00")).to_have_count(0)
    await alice.create_task("Newest")  # live, on top, while the list is partly read
    await expect(items.first).to_contain_text("Newest")
    await tab.button("Show more").click()
    await expect(items).to_have_count(PAGE_SIZE + 3)
    await expect(items.last).to_contain_text("Task 00")
    await expect(tab.button("Show more")).to_be_hidden()
    await expect(tab.page.locator("#list-status")).to_have_text(f"{PAGE_SIZE + 3} tasks")


async def test_a_strangers_tasks_never_appear(
    client: Client, alice: User, bob: User, open_tab: Any
) -> None:
    await bob.create_task("Bob's before")
    tab = await open_tab(url_of(client))
    await tab.log_in("alice")
    await tab.logged_in("alice")
    await bob.create_task("Bob's during")
    await alice.create_task("Alice's own")  # after Bob's: once it shows, his would have too
    await expect(tab.done_box("Alice's own")).to_be_visible()
    await expect(tab.page.get_by_role("listitem")).to_have_count(1)
    await tab.page.get_by_label("Search").fill("Bob")
    await expect(tab.page.locator("#list-status")).to_have_text("No tasks match.")
    await expect(tab.page.get_by_role("listitem")).to_have_count(0)


async def test_markup_in_a_title_is_shown_as_text(
    client: Client, alice: User, open_tab: Any
) -> None:
    await alice.create_task(XSS, description=f"<b>{XSS}</b>")  # in the first list
    tab = await open_tab(url_of(client))
    await tab.log_in("alice")
    await tab.logged_in("alice")
    await expect(tab.done_box(XSS)).to_be_visible()
    await alice.create_task(f"live {XSS}")  # through the stream
    await expect(tab.done_box(f"live {XSS}")).to_be_visible()
    await tab.add(f"typed {XSS}", XSS)  # through the form
    await expect(tab.task(XSS)).to_contain_text(f"<b>{XSS}</b>")
    await expect(tab.page.get_by_role("listitem")).to_have_count(3)
    await expect(tab.page.locator("#tasks img, #tasks b")).to_have_count(0)
    # `clean()` at teardown: no dialog opened, no script error, no CSP violation.


async def test_access_token_is_refreshed_and_the_stream_resumes_after_reauth(
    aiohttp_client: ClientFactory, make_settings: SettingsFactory, open_tab: Any
) -> None:
    client = await aiohttp_client(create_app(make_settings(auth={"access_ttl": 3})))
    await register_and_login(client, "dave")
    tab = await open_tab(url_of(client))
    page = tab.page
    async with page.expect_request("**/api/token/refresh/") as refreshed:
        await tab.log_in("dave")
        await tab.logged_in("dave")
        # The stream's token expires: `reauth`, and a new stream from the last id.
        async with page.expect_request(lambda r: "/api/stream/" in r.url) as reconnected:
            pass
    assert (await refreshed.value).method == "POST"
    assert "last_event_id=" in (await reconnected.value).url
    dave = await log_in(client, "dave")  # tokens of 3 s: fresh ones
    await dave.create_task("After reauth")
    await expect(tab.done_box("After reauth")).to_be_visible()
    await expect(tab.live).to_have_text("Live updates on")


async def test_after_a_restart_the_page_reconnects_and_catches_up(
    make_settings: SettingsFactory, replicas: list[Replica], client: Client, open_tab: Any
) -> None:
    replica = Replica(make_settings())
    replicas.append(replica)
    await replica.start()
    async with aiohttp.ClientSession(replica.url) as http:
        resp = await http.post("/api/register/", json={"username": "erin", "password": PASSWORD})
        assert resp.status == 201
    tab = await open_tab(replica.url)
    await tab.log_in("erin")
    await tab.logged_in("erin")
    await tab.add("Before the restart")

    await replica.stop()  # killed: the page loses its stream and its server
    await expect(tab.live).to_have_text("Live updates paused, reconnecting…")
    # Meanwhile a change through another replica (same Postgres and Redis).
    erin = await log_in(client, "erin")
    await erin.create_task("While it was down")

    await replica.start()
    await replica.wait_for("taskd is serving at", count=2)
    await expect(tab.done_box("While it was down")).to_be_visible(timeout=RESTART_MS)
    await expect(tab.live).to_have_text("Live updates on")
    await expect(tab.page.get_by_role("listitem")).to_have_count(2)


async def log_in(client: Client, username: str) -> User:
    """A user who registered through the page, logged in over HTTP."""
    async with client.post(
        "/api/login/", json={"username": username, "password": PASSWORD}
    ) as resp:
        assert resp.status == 200, await resp.text()
        tokens = await resp.json()
    async with client.get(
        "/api/me/", headers={"Authorization": f"Bearer {tokens['access']}"}
    ) as resp:
        user_id = (await resp.json())["id"]
    return User(client, user_id, username, tokens["access"], tokens["refresh"])


@pytest.mark.parametrize(("width", "height"), [(360, 740), (1100, 760)])
async def test_main_screen_fits_from_phone_to_desktop(
    client: Client, alice: User, open_tab: Any, width: int, height: int
) -> None:
    for title, description, done in (
        ("Renew the passport", "Photos are in the drawer", False),
        ("Book the dentist", "", True),
        ("Plan the garden", "Tomatoes, basil and a long row of sunflowers by the fence", False),
    ):
        await alice.create_task(title, description=description, done=done)
    tab = await open_tab(url_of(client), viewport={"width": width, "height": height})
    await tab.log_in("alice")
    await tab.logged_in("alice")
    await expect(tab.page.get_by_role("listitem")).to_have_count(3)
    overflow = await tab.page.evaluate("document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0, f"{overflow}px of horizontal scroll at {width}px"
    if SCREENSHOT and width > 1000:
        await tab.page.get_by_label("Title").blur()
        await tab.page.screenshot(path=SCREENSHOT, full_page=True)
