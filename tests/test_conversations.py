"""The conversation routes through FastAPI's TestClient, on SQLite and PostgreSQL: a user's
chats listed newest first and read back turn by turn (regenerated, corrected and edited turns as
the user last saw them, each answer with its completion id and the user's votes), hidden from
other users, and taken off the list; and the feedback history's prompt and second answer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from alignloop.config import ServeConfig
from alignloop.feedback.store import FeedbackStore, upgrade
from alignloop.serve.app import create_app
from alignloop.serve.engine import ServedModel


class Chats:
    def __init__(self, client: TestClient, store: FeedbackStore, keys: dict[str, str]) -> None:
        self.client, self.store, self.keys = client, store, keys

    def get(self, path: str, user: str = "ann") -> Any:
        return self.client.get(path, headers={"Authorization": f"Bearer {self.keys[user]}"})

    def delete(self, path: str, user: str = "ann") -> Any:
        return self.client.delete(path, headers={"Authorization": f"Bearer {self.keys[user]}"})

    def say(self, conversation_id: str | None, messages: list[dict], user: str = "ann", **body: Any) -> dict:
        """One chat turn; returns the answer as the next request's history holds it, with its id."""
        body = {"model": "tiny", "messages": messages, "max_tokens": 6, "conversation_id": conversation_id, **body}
        r = self.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {self.keys[user]}"})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return {"role": "assistant", "content": choice["message"]["content"], "id": choice["completion_id"]}

    def feedback(self, **body: Any) -> None:
        r = self.client.post("/v1/feedback", json=body, headers={"Authorization": f"Bearer {self.keys['ann']}"})
        assert r.status_code == 201, r.text


@contextmanager
def chats(db_url: str, served: ServedModel) -> Iterator[Chats]:
    upgrade(db_url)
    store = FeedbackStore(db_url)
    keys = {"ann": store.add_user("ann"), "bob": store.add_user("bob")}
    with TestClient(create_app(ServeConfig(), store, [served])) as client:
        yield Chats(client, store, keys)


def message(answer: dict) -> dict:
    return {"role": "assistant", "content": answer["content"]}


def test_conversations_are_listed_newest_first_and_only_to_their_owner(any_db_url: str, served: ServedModel) -> None:
    with chats(any_db_url, served) as c:
        long_question = "Tell me   about the history of the Roman empire, from its founding to the fall of Constantinople"
        c.say("c-rome", [{"role": "user", "content": long_question}])
        u1 = {"role": "user", "content": "Hi"}
        first = c.say("c-hi", [u1])
        c.say("c-hi", [u1, message(first), {"role": "user", "content": "And then?"}])
        c.say("c-bob", [{"role": "user", "content": "Bob here"}], user="bob")
        c.say(None, [{"role": "user", "content": "no conversation"}])

        listed = c.get("/v1/conversations").json()["data"]
        assert [(x["id"], x["model"]) for x in listed] == [("c-hi", "tiny"), ("c-rome", "tiny")]
        assert listed[0]["title"] == "Hi"
        title = listed[1]["title"]  # whitespace collapsed, cut with an ellipsis
        assert title.startswith("Tell me about the history of the Roman empire") and title.endswith("…") and len(title) == 60
        assert listed[0]["updated_at"] >= listed[1]["updated_at"]
        assert [x["id"] for x in c.get("/v1/conversations?limit=1").json()["data"]] == ["c-hi"]

        # Another user's conversation is a 404 to read and to delete, as a missing one is.
        for method in (c.get, c.delete):
            r = method("/v1/conversations/c-hi", user="bob")
            assert r.status_code == 404 and r.json()["error"]["param"] == "conversation_id", r.text
        assert [x["id"] for x in c.get("/v1/conversations", user="bob").json()["data"]] == ["c-bob"]
        r = c.get("/v1/conversations/" + "x" * 101)
        assert r.status_code == 422 and "conversation_id" in r.text

        # Deleted: off the list and unreadable; the completions and feedback on them stay.
        c.feedback(kind="thumbs", completion_id=first["id"], up=True)
        assert c.delete("/v1/conversations/c-hi").status_code == 204
        assert [x["id"] for x in c.get("/v1/conversations").json()["data"]] == ["c-rome"]
        assert c.get("/v1/conversations/c-hi").status_code == 404
        assert c.delete("/v1/conversations/c-hi").status_code == 404
        assert c.store.get_completion(first["id"]).conversation_id is None
        assert [f.up for f in c.store.list_feedback(c.store.user_by_key(c.keys["ann"]).id)] == [True]


def test_a_conversation_reads_back_as_last_seen_with_completion_ids_and_votes(any_db_url: str, served: ServedModel) -> None:
    with chats(any_db_url, served) as c:
        u1 = {"role": "user", "content": "Hello"}
        first = c.say("c1", [u1], seed=1)
        regenerated = c.say("c1", [u1], seed=2)  # "Regenerate": the same history, a new answer
        u2 = {"role": "user", "content": "Tell me more"}
        second = c.say("c1", [u1, message(regenerated), u2])
        c.feedback(kind="thumbs", completion_id=second["id"], up=False, tags=["wrong"], comment="made up")
        c.feedback(kind="rating", completion_id=regenerated["id"], rating=4)

        turns = c.get("/v1/conversations/c1").json()["turns"]
        assert [(t["role"], t["content"], t["completion_id"]) for t in turns] == [
            ("user", "Hello", None), ("assistant", regenerated["content"], regenerated["id"]),
            ("user", "Tell me more", None), ("assistant", second["content"], second["id"])]
        assert first["id"] not in {t["completion_id"] for t in turns}
        assert turns[1]["votes"] == {"thumbs": None, "rating": 4, "correction": None}
        assert turns[3]["votes"] == {"thumbs": False, "rating": None, "correction": None}
        assert turns[3]["model"] == "tiny" and turns[3]["finish_reason"] in ("stop", "length")

        # A corrected answer is resent as corrected: the turn shows it, keeps its id and the original.
        c.feedback(kind="correction", completion_id=second["id"], correction="The better answer.")
        fixed = {"role": "assistant", "content": "The better answer."}
        third = c.say("c1", [u1, message(regenerated), u2, fixed, {"role": "user", "content": "Thanks"}])
        turns = c.get("/v1/conversations/c1").json()["turns"]
        assert (turns[3]["content"], turns[3]["completion_id"], turns[3]["original"]) == (
            "The better answer.", second["id"], second["content"])
        assert turns[3]["votes"]["correction"] == "The better answer." and turns[5]["completion_id"] == third["id"]

        # "Edit and resend" of the second question: the history forks there and reads back forked.
        edited = c.say("c1", [u1, message(regenerated), {"role": "user", "content": "Say it shorter"}])
        turns = c.get("/v1/conversations/c1").json()["turns"]
        assert [t["content"] for t in turns] == ["Hello", regenerated["content"], "Say it shorter", edited["content"]]
        assert turns[3]["completion_id"] == edited["id"]
        # An answer stopped mid-stream was never stored: kept by the client, it has no completion id.
        partial = {"role": "assistant", "content": "Half an answ"}
        c.say("c1", [u1, message(regenerated), {"role": "user", "content": "Say it shorter"}, partial,
                     {"role": "user", "content": "Go on"}])
        turns = c.get("/v1/conversations/c1").json()["turns"]
        assert (turns[3]["content"], turns[3]["completion_id"], turns[3]["votes"]) == (
            "Half an answ", None, {"thumbs": None, "rating": None, "correction": None})


def test_feedback_history_carries_the_prompt_and_both_answers_of_a_comparison(any_db_url: str, served: ServedModel) -> None:
    with chats(any_db_url, served) as c:
        r = c.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {c.keys['ann']}"},
                          json={"model": "tiny", "n": 2, "max_tokens": 6,
                                "messages": [{"role": "user", "content": "Tell me a story."}]})
        a, b = r.json()["choices"]
        c.feedback(kind="pairwise", completion_id=a["completion_id"], other_completion_id=b["completion_id"], verdict="b", left="a")
        [item] = c.get("/v1/feedback").json()["data"]
        assert (item["prompt_text"], item["completion_text"], item["other_completion_text"]) == (
            "Tell me a story.", a["message"]["content"], b["message"]["content"])
        assert c.get(f"/v1/feedback/{item['id']}").json()["other_completion_text"] == b["message"]["content"]
