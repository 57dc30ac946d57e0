"""The dataset rules on hand-made feedback rows: each vote kind becomes the records
the table in :mod:`alignloop.feedback.datasets` says, with the feedback ids behind each record;
windows, versions, per-user caps, agreement, sibling thumbs and dedupe do what they say; and the
rows read back from a real store build the same sets."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from alignloop.config import LoopRulesConfig
from alignloop.data.records import Row, validate_rows
from alignloop.errors import ConfigError
from alignloop.feedback.datasets import DatasetRules, build_datasets
from alignloop.feedback.entities import Answer, Vote

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
HI = [{"role": "user", "content": "Hi!"}]


def answer(cid: str, text: str, prompt: object = None, version: str = "v0") -> Answer:
    prompt = HI if prompt is None else prompt
    return Answer(cid, prompt, repr(prompt), text, version)


A, B, C = answer("c1", "Hello there!"), answer("c2", "Go away."), answer("c3", "Hi, nice to see you.")
OTHER_PROMPT = answer("c9", "Sure.", prompt=[{"role": "user", "content": "Help?"}])


def vote(fid: int, kind: str, a: Answer = A, b: Answer | None = None, user: str = "ann", minutes: int = 0, **fields) -> Vote:
    return Vote(fid, user, kind, T0 + timedelta(minutes=minutes), a, b, **fields)


def texts(records: list[dict], *names: str) -> list[tuple]:
    return [tuple(r[n][0]["content"] if isinstance(r[n], list) else r[n] for n in names) for r in records]


def test_each_vote_kind_becomes_its_records() -> None:
    votes = [
        vote(1, "pairwise", A, B, verdict="a"),
        vote(2, "pairwise", C, B, verdict="b", user="bob"),  # b = B chosen
        vote(3, "pairwise", A, C, verdict="tie"),
        vote(4, "pairwise", B, C, verdict="both_bad", user="cy"),
        vote(5, "thumbs", C, up=True),
        vote(6, "correction", B, correction="Hello! How can I help?"),
        vote(7, "rating", A, rating=4),
        vote(8, "pairwise", A, OTHER_PROMPT, verdict="a", user="dee"),
    ]
    sets = build_datasets(votes, DatasetRules(sibling_thumbs=False))
    assert sorted(texts(sets.pairs, "chosen", "rejected")) == sorted(
        [("Hello there!", "Go away."), ("Go away.", "Hi, nice to see you."), ("Hello! How can I help?", "Go away.")])
    assert sorted(texts(sets.kto, "completion", "label")) == sorted(
        [("Go away.", False), ("Hi, nice to see you.", False), ("Hi, nice to see you.", True)])
    assert texts(sets.sft, "completion") == [("Hello! How can I help?",)]
    assert [(r["rating"], r["user"]) for r in sets.ratings] == [(4, "ann")]
    assert sets.skipped == {"tie": 1, "different_prompts": 1}
    assert sets.feedback_ids == {1, 2, 4, 5, 6, 7}  # the tie and the mismatched pair trained nothing
    # Every set is valid training data of its kind.
    for records, kind in ((sets.pairs, "preference"), (sets.kto, "binary"), (sets.sft, "prompt_completion"), (sets.ratings, "rating")):
        assert validate_rows([Row(dict(r), f"row {i}") for i, r in enumerate(records)], [kind], "test") == kind


def test_window_versions_and_per_user_cap() -> None:
    new = answer("c4", "Howdy!", version="v1")
    votes = [vote(i, "thumbs", A, up=True, minutes=i) for i in range(1, 6)] + [vote(6, "thumbs", new, up=False, user="bob", minutes=6)]
    window = build_datasets(votes, DatasetRules(since=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=6), dedupe=False))
    assert sorted(i for r in window.kto for i in r["feedback_ids"]) == [3, 4, 5] and window.skipped["outside_window"] == 3
    versions = build_datasets(votes, DatasetRules(model_versions=["v1"]))
    assert [r["feedback_ids"] for r in versions.kto] == [[6]] and versions.skipped["other_model_version"] == 5
    capped = build_datasets(votes, DatasetRules(max_votes_per_user=2, dedupe=False))
    assert sorted(i for r in capped.kto for i in r["feedback_ids"]) == [4, 5, 6]  # ann's newest two, bob's one
    assert capped.skipped["over_user_cap"] == 3
    with pytest.raises(ConfigError, match="max_votes_per_user"):
        DatasetRules(max_votes_per_user=0)
    with pytest.raises(ConfigError, match="min_agreement"):
        DatasetRules(min_agreement=0.3)


def test_agreement_between_users_on_the_same_pair() -> None:
    three_to_one = [vote(1, "pairwise", A, B, verdict="a", user="u1"), vote(2, "pairwise", B, A, verdict="b", user="u2"),
                    vote(3, "pairwise", A, B, verdict="a", user="u3"), vote(4, "pairwise", A, B, verdict="b", user="u4")]
    kept = build_datasets(three_to_one, DatasetRules(min_agreement=0.75))
    assert texts(kept.pairs, "chosen", "rejected") == [("Hello there!", "Go away.")]
    assert kept.pairs[0]["feedback_ids"] == [1, 2, 3] and kept.skipped["outvoted"] == 1
    strict = build_datasets(three_to_one, DatasetRules(min_agreement=0.8))
    assert strict.pairs == [] and strict.skipped["disagreement"] == 4
    split = build_datasets(three_to_one[:1] + three_to_one[3:], DatasetRules())  # 1 against 1
    assert split.pairs == [] and split.skipped["disagreement"] == 2


def test_sibling_thumbs_and_dedupe() -> None:
    votes = [vote(1, "thumbs", A, up=True), vote(2, "thumbs", B, up=False, user="bob"), vote(3, "thumbs", OTHER_PROMPT, up=False),
             vote(4, "pairwise", A, B, verdict="a", user="cy")]
    sets = build_datasets(votes, DatasetRules())
    # A ≻ B comes from the sibling thumbs (1, 2) and from the comparison (4): one record, both reasons.
    assert texts(sets.pairs, "chosen", "rejected") == [("Hello there!", "Go away.")]
    assert sets.pairs[0]["feedback_ids"] == [1, 2, 4] and sets.skipped["duplicate_pairs"] == 1
    # OTHER_PROMPT has no sibling: thumbs only.
    assert len(sets.kto) == 3
    off = build_datasets(votes, DatasetRules(sibling_thumbs=False, dedupe=False))
    assert [r["source"] for r in off.pairs] == ["pairwise"]


def test_rows_from_a_real_store_build_the_same_sets(tmp_path: Path) -> None:
    from alignloop.feedback.store import CompletionRecord, FeedbackInput, FeedbackStore, upgrade

    url = f"sqlite:///{tmp_path}/feedback.db"
    upgrade(url)
    with FeedbackStore(url) as store:
        key = store.add_user("ann")
        user = store.user_by_key(key)
        store.register_model("m", "v0", "/m")
        store.add_completions([
            CompletionRecord(id=f"chatcmpl-x-{i}", request_id="chatcmpl-x", choice_index=i, user_id=user.id, model_name="m",
                             model_version="v0", endpoint="chat", prompt_messages=HI, prompt_text=None, rendered_prompt="<hi>",
                             prompt_tokens=3, completion_text=text, completion_token_ids=[1], finish_reason="stop", sampling={},
                             latency_ms=1.0, ttft_ms=1.0)
            for i, text in enumerate(["Hello there!", "Go away."])
        ])
        store.put_feedback(user.id, FeedbackInput(kind="pairwise", completion_id="chatcmpl-x-0", other_completion_id="chatcmpl-x-1",
                                                  verdict="a", left="b"))
        store.put_feedback(user.id, FeedbackInput(kind="thumbs", completion_id="chatcmpl-x-1", up=False))
        votes = store.votes()
    assert [(v.kind, v.user, v.a.text, v.b.text if v.b else None) for v in votes] == [
        ("pairwise", "ann", "Hello there!", "Go away."), ("thumbs", "ann", "Go away.", None)]
    assert votes[0].updated_at.tzinfo is not None
    sets = build_datasets(votes, DatasetRules())
    assert texts(sets.pairs, "chosen", "rejected") == [("Hello there!", "Go away.")]
    assert texts(sets.kto, "completion", "label") == [("Go away.", False)]
    assert sets.feedback_ids == {v.feedback_id for v in votes}


def test_the_default_rules_are_the_loops() -> None:
    """`alignloop feedback export` (default rules) and a loop with default `rules:` build the same sets."""
    loop = LoopRulesConfig()
    shared = [f.name for f in dataclasses.fields(DatasetRules) if hasattr(loop, f.name)]
    assert shared == ["max_votes_per_user", "min_agreement", "sibling_thumbs", "both_bad_as_kto", "dedupe"]
    assert [getattr(DatasetRules(), name) for name in shared] == [getattr(loop, name) for name in shared]
