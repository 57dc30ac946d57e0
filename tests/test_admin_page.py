"""The admin page in a real browser against a real ``alignloop serve``: an admin logs in, adds a
user (whose key then works) and revokes them (the key then gets 401 from the API), reads a
version's lineage, rolls the server back to the older version (``/v1/models`` then reports it),
downloads an export, and reads the batch counters. Screenshots at laptop and phone widths go
with the chat page's, to ``$ALIGNLOOP_ARTIFACTS/browser/admin``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import test_browser
from test_browser import LAPTOP, PHONE, _browser_page, _screenshots, _serve, expect

pytestmark = test_browser.pytestmark  # browser, and skipped (saying why) without chromium or playwright


def _get(base_url: str, path: str, key: str) -> tuple[int, Any]:
    request = urllib.request.Request(base_url + path, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(base_url: str, path: str, key: str, body: dict) -> dict:
    request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _full_pages(page: Any, shots: Path, name: str) -> None:
    """``NAME-full-1280.png`` and ``NAME-full-375.png``: the whole page, top to bottom (the
    shared helper shows what a user sees scrolled to the end)."""
    for viewport in (LAPTOP, PHONE):
        page.set_viewport_size(viewport)
        page.evaluate("window.scrollTo(0, 0)")  # scrolled down, the laptop's sticky header would be drawn mid-page
        page.screenshot(path=str(shots / f"{name}-full-{viewport['width']}.png"), full_page=True)
    page.set_viewport_size(LAPTOP)


def _served_version(base_url: str, key: str) -> str:
    status, body = _get(base_url, "/v1/models", key)
    assert status == 200, body
    [card] = body["data"]
    return card["version"]


def test_admin_page_adds_and_revokes_a_user_and_rolls_back_a_version(tiny_model_dir: Path, other_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    from alignloop.feedback.store import FeedbackStore

    shots = tmp_path / "admin"
    with _serve([f"tiny={tiny_model_dir}"], tmp_path) as server, _browser_page(shots) as page:
        with closing(FeedbackStore(server.db_url)) as store:
            root = store.add_user("root", admin=True)
        v0 = _served_version(server.base_url, root)
        # A promotion, as the loop makes one: the server now serves v1, whose parent is v0.
        v1 = _post(server.base_url, "/admin/deploy", root, {"name": "tiny", "path": str(other_model_dir)})["version"]
        with closing(FeedbackStore(server.db_url)) as store:
            store.register_trained("tiny", v1, str(other_model_dir), parent_version=v0, run_dir=str(tmp_path / "loop"),
                                   datasets={}, feedback=[])
        assert v1 != v0 and _served_version(server.base_url, root) == v1

        page.goto(server.base_url + "/admin")
        page.get_by_label("API key").fill(server.key)  # alice: a user, not an admin
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#login-error")).to_contain_text("alice is not an admin")
        page.get_by_label("API key").fill(root)
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#user-name")).to_have_text("root")
        users = page.locator("#user-list")
        expect(users.locator(".user-row")).to_have_count(2)
        expect(page.get_by_role("button", name="Revoke root's key")).to_have_count(0)  # not one's own

        page.get_by_label("New user's name").fill("carol")
        page.get_by_role("button", name="Add user").click()
        expect(page.locator("#users-status")).to_have_text("Added carol.")
        carol_key = page.locator("#new-key-value").text_content() or ""
        assert carol_key.startswith("al-")
        assert _get(server.base_url, "/v1/me", carol_key) == (200, {"id": 3, "name": "carol", "admin": False, "auth": True})
        expect(users.locator(".user-row")).to_have_count(3)

        page.get_by_role("button", name="Revoke carol's key").click()
        expect(page.locator("#users-status")).to_contain_text("Revoked carol's key")
        expect(users.locator('[data-user="carol"]')).to_contain_text("key revoked")
        status, body = _get(server.base_url, "/v1/me", carol_key)
        assert status == 401 and body["error"]["type"] == "authentication_error"

        versions = page.locator("#version-list")
        expect(versions.locator(".version-row")).to_have_count(2)
        expect(versions.locator(f'[data-version="{v1}"]')).to_contain_text("serving")
        page.get_by_role("button", name=f"Lineage of version {v1}").click()
        expect(versions.locator(f'[data-version="{v1}"] .lineage')).to_contain_text(f"Ancestry: {v1[:12]} ← {v0[:12]}")
        expect(page.locator("#stats-list [data-model='tiny']")).to_contain_text(v1[:12])
        _screenshots(page, shots, "admin")
        _full_pages(page, shots, "admin")

        page.get_by_role("button", name=f"Roll back to version {v0}").click()
        expect(page.locator("#registry-status")).to_have_text(f"tiny now serves {v0[:12]} (was {v1[:12]}).", timeout=60_000)
        assert _served_version(server.base_url, root) == v0
        expect(versions.locator(f'[data-version="{v0}"]')).to_contain_text("serving")
        expect(page.get_by_role("button", name=f"Deploy version {v1}")).to_be_visible()
        expect(page.locator("#stats-list [data-model='tiny']")).to_contain_text(v0[:12])

        page.get_by_label("Records").select_option("kto")
        with page.expect_download() as download:
            page.get_by_role("button", name="Download").click()
        assert download.value.suggested_filename == "kto.jsonl"
        expect(page.locator("#export-status")).to_have_text("Downloaded 0 kto records as kto.jsonl; skipped: none.")
        _screenshots(page, shots, "admin-rolled-back")

        with closing(FeedbackStore(server.db_url)) as store:
            assert [m["version"] for m in store.models() if m["deployed"]] == [v0]
            assert {u.name: u.has_key for u in store.list_users()} == {"alice": True, "root": True, "carol": False}

    assert sorted(p.name for p in shots.glob("*.png")) == [
        f"{name}-{width}.png" for name in ("admin", "admin-full", "admin-rolled-back") for width in (1280, 375)]
