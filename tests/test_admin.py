"""The admin routes behind the admin page, through FastAPI's TestClient on SQLite and PostgreSQL:
admins only; users added (the key shown once), revoked (the key refused at once), rotated; the
registry listed with lineage and rolled back (the server then answers with the older version);
model paths stored absolute, so a server started from another folder finds them; and
``alignloop lineage --user`` saying which versions a user's feedback trained, or why none."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore, model_path, upgrade
from alignloop.serve.app import create_app
from alignloop.serve.engine import ServedModel

HI = [{"role": "user", "content": "Hi there, how are you?"}]


class Admin:
    """A TestClient on a server of ``tiny``; ``keys`` maps user name → API key (root is the admin)."""

    def __init__(self, client: TestClient, store: FeedbackStore, keys: dict[str, str]) -> None:
        self.client, self.store, self.keys = client, store, keys

    def call(self, method: str, path: str, user: str | None = "root", **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.keys[user]}"} if user else {}
        return self.client.request(method, path, headers=headers, **kwargs)

    def as_key(self, key: str, path: str = "/v1/me") -> int:
        return self.client.get(path, headers={"Authorization": f"Bearer {key}"}).status_code

    def served_version(self) -> str:
        [card] = self.call("GET", "/v1/models").json()["data"]
        return card["version"]


@contextmanager
def admin_api(db_url: str, served: ServedModel) -> Iterator[Admin]:
    upgrade(db_url)
    store = FeedbackStore(db_url)
    keys = {"root": store.add_user("root", admin=True), "ann": store.add_user("ann"), "bob": store.add_user("bob")}
    with TestClient(create_app(ServeConfig(), store, [served])) as client:
        yield Admin(client, FeedbackStore(db_url), keys)


def error_of(response: Any) -> dict:
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]


ROUTES = [("GET", "/admin/users", None), ("POST", "/admin/users", {"name": "zed"}), ("POST", "/admin/users/bob/revoke", None),
          ("POST", "/admin/users/bob/rotate", None), ("GET", "/admin/models", None), ("GET", "/admin/stats", None),
          ("GET", "/admin/export?kind=pairs", None)]


def test_admin_routes_answer_401_without_a_key_and_403_to_a_user(migrated_sqlite_url: str, served: ServedModel) -> None:
    with admin_api(migrated_sqlite_url, served) as a:
        for method, path, body in ROUTES:
            assert a.call(method, path, user=None, json=body).status_code == 401, path
            refused = a.call(method, path, user="ann", json=body)
            assert refused.status_code == 403 and error_of(refused)["type"] == "permission_error", path
        assert [u.name for u in a.store.list_users()] == ["root", "ann", "bob"]  # nothing was added
        assert a.as_key(a.keys["bob"]) == 200  # nor revoked or rotated
        page = a.client.get("/admin")  # the page itself is public, like the chat page; its data is not
        assert page.status_code == 200 and "admin.js" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]


def test_users_are_added_revoked_and_rotated(any_db_url: str, served: ServedModel) -> None:
    with admin_api(any_db_url, served) as a:
        added = a.call("POST", "/admin/users", json={"name": " carol ", "admin": False})
        assert added.status_code == 201, added.text
        carol_key = added.json()["key"]
        assert added.json()["user"] == {"id": added.json()["user"]["id"], "name": "carol", "admin": False, "active": True}
        assert a.client.get("/v1/me", headers={"Authorization": f"Bearer {carol_key}"}).json()["name"] == "carol"
        assert carol_key not in a.call("GET", "/admin/users").text  # shown once, never listed

        for body, field in (({"name": "carol"}, "name"), ({"name": "   "}, "name"), ({"name": ""}, "name"),
                            ({"name": "dan", "admin": "yes"}, "admin"), ({"name": "dan", "role": "x"}, "role")):
            refused = a.call("POST", "/admin/users", json=body)
            assert refused.status_code == 422 and error_of(refused)["param"] == field, (body, refused.text)

        revoked = a.call("POST", "/admin/users/carol/revoke")
        assert revoked.status_code == 200 and revoked.json()["active"] is False
        assert a.as_key(carol_key) == 401  # at once, on the running server
        listed = {u["name"]: u for u in a.call("GET", "/admin/users").json()["data"]}
        assert (listed["carol"]["active"], listed["root"]["admin"], listed["ann"]["admin"]) == (False, True, False)

        missing = a.call("POST", "/admin/users/nobody/revoke")
        assert missing.status_code == 404 and error_of(missing)["param"] == "name"
        own = a.call("POST", "/admin/users/root/revoke")  # would lock the admin out of the page
        assert own.status_code == 409 and error_of(own)["param"] == "name" and "you" in error_of(own)["message"]
        assert a.as_key(a.keys["root"]) == 200

        rotated = a.call("POST", "/admin/users/carol/rotate")  # a revoked user gets a working key back
        assert rotated.status_code == 200 and rotated.json()["user"]["active"] is True
        assert a.as_key(rotated.json()["key"]) == 200 and a.as_key(carol_key) == 401
        old_ann = a.keys["ann"]
        new_ann = a.call("POST", "/admin/users/ann/rotate").json()["key"]
        assert a.as_key(old_ann) == 401 and a.as_key(new_ann) == 200
        assert a.call("POST", "/admin/users/nobody/rotate").status_code == 404


def test_the_registry_lists_lineage_and_rolls_back(any_db_url: str, tiny_model_dir: Path, other_model_dir: Path) -> None:
    served = ServedModel("tiny", str(tiny_model_dir))  # its own: a deploy stops it
    with admin_api(any_db_url, served) as a:
        v0 = served.version
        promoted = a.call("POST", "/admin/deploy", json={"name": "tiny", "path": str(other_model_dir)})
        v1 = promoted.json()["version"]
        assert v1 != v0 and a.served_version() == v1
        # The loop records where v1 came from: its parent and the votes behind it.
        completion = a.client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 4},
                                   headers={"Authorization": f"Bearer {a.keys['ann']}"}).json()["choices"][0]["completion_id"]
        vote = a.client.post("/v1/feedback", json={"kind": "thumbs", "completion_id": completion, "up": True},
                             headers={"Authorization": f"Bearer {a.keys['ann']}"}).json()
        a.store.register_trained("tiny", v1, str(other_model_dir), parent_version=v0, run_dir="runs/loop/iter-1",
                                 datasets={}, feedback=[(vote["id"], "ann", "thumbs")])
        a.store.record_evaluation(v1, {"passed": True, "metrics": {"win_rate": 0.7}})

        rows = {r["version"]: r for r in a.call("GET", "/admin/models").json()["data"]}
        assert list(rows) == [v0, v1]
        assert (rows[v1]["serving"], rows[v1]["deployed"], rows[v0]["serving"], rows[v0]["deployed"]) == (True, True, False, False)
        assert (rows[v1]["parent_version"], rows[v1]["feedback_rows"], rows[v1]["evaluation"]["metrics"]) == (v0, 1, {"win_rate": 0.7})
        assert rows[v0]["path"] == str(tiny_model_dir.resolve()) and rows[v1]["path"] == str(other_model_dir.resolve())
        lineage = a.call("GET", f"/admin/models/{v1}/lineage").json()
        assert lineage == {"version": v1, "ancestry": [v1, v0], "feedback": [{"feedback_id": vote["id"], "user_name": "ann", "kind": "thumbs"}]}

        rollback = a.call("POST", f"/admin/models/{v0}/deploy")
        assert rollback.status_code == 200, rollback.text
        assert rollback.json() == {"name": "tiny", "version": v0, "previous_version": v1, "requested_version": v0, "warning": None}
        assert a.served_version() == v0
        answer = a.client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 4},
                               headers={"Authorization": f"Bearer {a.keys['bob']}"}).json()
        assert answer["model_version"] == v0
        assert [m["version"] for m in a.store.models() if m["deployed"]] == [v0]

        for path in (f"/admin/models/{'f' * 16}/lineage", f"/admin/models/{'f' * 16}/deploy"):
            missing = a.call("GET" if path.endswith("lineage") else "POST", path)
            assert missing.status_code == 404 and error_of(missing)["param"] == "version", path
        assert a.call("POST", f"/admin/models/{v1}/deploy", user="ann").status_code == 403
        assert a.served_version() == v0


def test_registry_paths_are_absolute_so_a_server_started_elsewhere_finds_them(
        migrated_sqlite_url: str, tmp_path: Path, tiny_model_dir: Path, other_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, here / "base")
    shutil.copytree(other_model_dir, here / "better")
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    served = ServedModel("tiny", "base")  # `alignloop serve --model tiny=base`, relative
    with admin_api(migrated_sqlite_url, served) as a:
        v0 = served.version
        v1 = a.call("POST", "/admin/deploy", json={"name": "tiny", "path": "better"}).json()["version"]
        paths = {m["version"]: m["path"] for m in a.store.models()}
        assert paths == {v0: str(here.resolve() / "base"), v1: str(here.resolve() / "better")}

    monkeypatch.chdir(elsewhere)  # another server on the same database, started from another folder
    store = FeedbackStore(migrated_sqlite_url)
    root = store.add_user("root2", admin=True)
    with TestClient(create_app(ServeConfig(), store, [ServedModel("tiny", paths[v1])])) as client:
        r = client.post(f"/admin/models/{v0}/deploy", headers={"Authorization": f"Bearer {root}"})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == v0


def test_model_path_resolves_local_folders_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs")
    assert model_path("sft/final") == str((tmp_path / "runs" / "sft" / "final").resolve())
    assert model_path("../runs/./sft/final/") == str((tmp_path / "runs" / "sft" / "final").resolve())
    assert model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a Hub id stays one
    assert model_path("tiny-5m") == "tiny-5m"


# --- `alignloop lineage --user` ------------------------------------------------------------------

def test_lineage_by_user_names_the_versions_or_says_why_none(migrated_sqlite_url: str, served: ServedModel,
                                                           capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    """ann's pairwise vote made the pairs a dpo recipe trained v1 on; bob's lone thumbs made
    none (a kto record only), so bob's line says so instead of printing nothing."""
    from alignloop.cli import main

    url = migrated_sqlite_url
    with admin_api(url, served) as a:
        def vote(user: str, **body: Any) -> int:
            r = a.client.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {a.keys[user]}"})
            assert r.status_code == 201, r.text
            return r.json()["id"]

        def answers(user: str, n: int) -> list[str]:
            r = a.client.post("/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 4, "n": n},
                              headers={"Authorization": f"Bearer {a.keys[user]}"})
            return [c["completion_id"] for c in r.json()["choices"]]

        first, second = answers("ann", 2)
        ann_vote = vote("ann", kind="pairwise", completion_id=first, other_completion_id=second, verdict="a")
        vote("bob", kind="thumbs", completion_id=answers("bob", 1)[0], up=False)
        v0 = served.version
        a.store.register_trained("tiny", "v1-trained", "runs/loop/iter-1/train/final", parent_version=v0, run_dir="runs/loop",
                                 datasets={}, feedback=[(ann_vote, "ann", "pairwise")])
    capsys.readouterr()

    assert main(["lineage", "--user", "ann", "--db", url]) == 0
    assert capsys.readouterr().out.split() == ["v1-trained"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignloop"):
        assert main(["lineage", "--user", "bob", "--db", url]) == 0
    assert capsys.readouterr().out == ""  # stdout stays a list of versions for scripts
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lineage:")]
    assert "no model version was trained on bob's feedback" in line and "1 thumbs" in line

    assert main(["lineage", "--user", "nobody", "--db", url]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == "alignloop: error: lineage: no user named 'nobody'; `alignloop users list` shows them"
