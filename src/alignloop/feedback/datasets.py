"""Votes → training sets, by documented rules: what ``alignloop feedback export``,
``GET /admin/export`` and each closed-loop iteration write, from one function
(:func:`build_datasets`) of the votes (:meth:`FeedbackStore.votes`) and the rules.

A set of training records is more than each vote on its own: votes from a time window or on given
model versions only, a cap per user so one prolific (or hostile) user cannot dominate, agreement
between users who judged the same pair, thumbs on sibling answers of one prompt turned into
pairs, and duplicates removed. The rules, applied in this order:

1. **window and versions**: votes last changed in ``[since, until)``; when ``model_versions`` is
   given, votes whose answers all come from those versions.
2. **per-user cap**: each user's newest ``max_votes_per_user`` votes.
3. **records**:

   | vote | becomes |
   | --- | --- |
   | pairwise a / b | a pair, the voted answer chosen; skipped as ``different_prompts`` when the two answers had different rendered prompts |
   | pairwise tie | nothing (counted as ``tie``) |
   | pairwise both_bad | two thumbs-down records when ``both_bad_as_kto``, else nothing (``both_bad``) |
   | thumbs | a thumbs record (KTO); with ``sibling_thumbs``, an up and a down on two answers to the same prompt also make a pair (up ≻ down) |
   | correction | an SFT example and a pair (correction ≻ original) |
   | rating | a rating record |
   | prediction (classification) | a bandit record: the shown label, its propensity, reward 1.0 if right else 0.0 |
   | prediction (NER) | a bandit record per judged shown entity (reward 1.0/0.0, propensity: its words' product); none when ``correct=false`` names no entity (``unjudged_entities``) |

4. **agreement**: a pair of answers judged (pairwise) by several users is kept, once, in the
   majority's direction only when the majority's share is at least ``min_agreement``; otherwise
   it is dropped (``disagreement``).
5. **dedupe**: the same (prompt, chosen, rejected), (prompt, completion, label) or
   (prompt, completion) once; its ``feedback_ids`` are merged.
6. a pair whose chosen equals its rejected teaches nothing (``identical_answers``).

The records are the record kinds of ARCHITECTURE.md in TRL's field names:

| set     | record                             | trains      |
| ------- | ---------------------------------- | ----------- |
| pairs   | prompt, chosen, rejected           | reward, DPO |
| kto     | prompt, completion, label          | KTO         |
| sft     | prompt, completion                 | SFT         |
| ratings | prompt, completion, rating, user   | reward      |
| bandit  | shown, propensity, reward (+ text, or tokens/start/end; label when known) | classifier (off-policy) |

The prompt is the chat messages (then completion, chosen and rejected are one assistant message,
TRL's conversational format) or the prompt string. Every record also carries ``source`` (the
vote kind, or ``sibling_thumbs``), the ``model_version`` of its answer (pairs: of the chosen one,
and ``rejected_model_version``) and the ``feedback_ids`` that made it (several when votes agree
or a duplicate was merged), so a model trained on it can name the exact feedback rows behind it.

A ``bandit`` record is one logged decision of a served classifier: what it showed (``shown``),
the probability its exploration policy gave that (``propensity``) and whether the user said it
was right (``reward``); ``label`` is the right answer where the feedback tells it (the shown one
when right, the user's ``label`` when given). Classification records carry ``text``; NER records
carry ``tokens`` and the entity's word span ``start``/``end`` (end exclusive), ``shown`` its type
and ``label`` the right type or ``"O"`` (no entity). Provenance: ``model_version``,
``prediction_id``, ``feedback_ids``, ``user``. Bandit records are never merged: each is one
decision with its own propensity, and each prediction belongs to one user.
"""

from __future__ import annotations

import json

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

from alignloop.errors import ConfigError
from alignloop.feedback.entities import Answer, Vote

RECORD_KINDS = ("pairs", "kto", "sft", "ratings", "bandit")


@dataclass(frozen=True)
class DatasetRules:
    """The module's rules; the defaults are ``alignloop feedback export``'s and the loop's
    (``LoopRulesConfig``, which says what each one does)."""

    since: Optional[datetime] = None
    until: Optional[datetime] = None
    model_versions: Optional[Sequence[str]] = None
    max_votes_per_user: Optional[int] = None
    min_agreement: float = 0.5
    sibling_thumbs: bool = True
    both_bad_as_kto: bool = True
    dedupe: bool = True

    def __post_init__(self) -> None:
        if self.max_votes_per_user is not None and self.max_votes_per_user < 1:
            raise ConfigError(f"max_votes_per_user must be ≥ 1 or null (got {self.max_votes_per_user})")
        if not 0.5 <= self.min_agreement <= 1:
            raise ConfigError(f"min_agreement must be in [0.5, 1] (got {self.min_agreement}); 0.5 keeps any majority or tie-free pair")


@dataclass
class Datasets:
    """The training sets of :data:`RECORD_KINDS`, what was skipped and why, and which rows were used."""

    pairs: list[dict] = field(default_factory=list)
    kto: list[dict] = field(default_factory=list)
    sft: list[dict] = field(default_factory=list)
    ratings: list[dict] = field(default_factory=list)
    bandit: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    @property
    def feedback_ids(self) -> set[int]:
        """Every feedback row behind some record: the lineage of what trains on these sets."""
        return {i for kind in RECORD_KINDS for r in getattr(self, kind) for i in r["feedback_ids"]}


def build_datasets(votes: Iterable[Vote], rules: DatasetRules) -> Datasets:
    """Apply the module's rules, in order, to ``votes``."""
    out = Datasets()
    kept = [v for v in votes if _in_scope(v, rules, out.skipped)]
    kept = _cap_per_user(kept, rules.max_votes_per_user, out.skipped)

    judged: dict[frozenset[str], list[tuple[Vote, Answer, Answer]]] = defaultdict(list)  # pair → (vote, chosen, rejected)
    thumbs_by_prompt: dict[str, list[Vote]] = defaultdict(list)
    for v in kept:
        if v.kind == "pairwise":
            if v.b is None:
                out.skipped["no_other_answer"] += 1
            elif v.verdict == "tie":
                out.skipped["tie"] += 1
            elif v.verdict == "both_bad":
                if rules.both_bad_as_kto:
                    out.kto += [_kto(v, answer, False) for answer in (v.a, v.b)]
                else:
                    out.skipped["both_bad"] += 1
            elif v.a.rendered_prompt != v.b.rendered_prompt:
                out.skipped["different_prompts"] += 1
            else:
                chosen, rejected = (v.a, v.b) if v.verdict == "a" else (v.b, v.a)
                judged[frozenset((v.a.completion_id, v.b.completion_id))].append((v, chosen, rejected))
        elif v.kind == "thumbs":
            out.kto.append(_kto(v, v.a, bool(v.up)))
            thumbs_by_prompt[v.a.rendered_prompt].append(v)
        elif v.kind == "correction":
            out.sft.append({"prompt": v.a.prompt, "completion": v.a.as_answer(v.correction), "feedback_ids": [v.feedback_id],
                            "source": "correction", "model_version": v.a.model_version})
            out.pairs.append(_pair(v.a, v.a.as_answer(v.correction), v.a.as_answer(), "correction", [v.feedback_id]))
        elif v.kind == "prediction":
            out.bandit += _bandit(v, out.skipped)
        elif v.kind == "rating":
            out.ratings.append({"prompt": v.a.prompt, "completion": v.a.as_answer(), "rating": v.rating, "user": v.user,
                                "feedback_ids": [v.feedback_id], "source": "rating", "model_version": v.a.model_version})
        else:
            out.skipped[f"unknown_kind_{v.kind}"] += 1

    out.pairs += _agreed_pairs(judged, rules.min_agreement, out.skipped)
    if rules.sibling_thumbs:
        out.pairs += _sibling_pairs(thumbs_by_prompt)
    if rules.dedupe:
        for name, key in (("pairs", ("chosen", "rejected")), ("kto", ("completion", "label")), ("sft", ("completion",))):
            setattr(out, name, _dedupe(getattr(out, name), key, out.skipped, name))
    out.pairs = [p for p in out.pairs if _differs(p, out.skipped)]
    # Votes come in the order they were written, which concurrent users' threads decide; each set
    # is put in an order of its content alone, so the same feedback gives the same files and
    # trains the same model (the loop's runs were otherwise at the mercy of thread timing).
    for kind in RECORD_KINDS:
        setattr(out, kind, sorted(getattr(out, kind), key=_content_key))
    return out


def _content_key(record: dict) -> str:
    """A record's content without the ids of the votes behind it (which follow arrival order)."""
    return json.dumps({k: v for k, v in record.items() if k != "feedback_ids"}, sort_keys=True, ensure_ascii=False, default=str)


def _in_scope(v: Vote, rules: DatasetRules, skipped: Counter) -> bool:
    if rules.since is not None and v.updated_at < rules.since or rules.until is not None and v.updated_at >= rules.until:
        skipped["outside_window"] += 1
        return False
    if rules.model_versions is not None:
        if not v.model_versions <= set(rules.model_versions):
            skipped["other_model_version"] += 1
            return False
    return True


def _cap_per_user(votes: list[Vote], cap: int | None, skipped: Counter) -> list[Vote]:
    if cap is None:
        return votes
    by_user: dict[str, list[Vote]] = defaultdict(list)
    for v in votes:
        by_user[v.user].append(v)
    keep: set[int] = set()
    for user_votes in by_user.values():
        newest = sorted(user_votes, key=lambda v: (v.updated_at, v.feedback_id), reverse=True)
        keep |= {v.feedback_id for v in newest[:cap]}
        if len(newest) > cap:
            skipped["over_user_cap"] += len(newest) - cap
    return [v for v in votes if v.feedback_id in keep]


def _agreed_pairs(judged: dict[frozenset[str], list[tuple[Vote, Answer, Answer]]], min_agreement: float,
                  skipped: Counter) -> list[dict]:
    pairs = []
    for verdicts in judged.values():
        # One direction per user: a user's vote on A-vs-B and B-vs-A is one live vote already.
        winners = Counter(chosen.completion_id for _, chosen, _ in verdicts)
        winner, count = winners.most_common(1)[0]
        share = count / len(verdicts)
        if len(winners) > 1 and (share < min_agreement or share == 0.5):
            skipped["disagreement"] += len(verdicts)
            continue
        majority = [(v, c, r) for v, c, r in verdicts if c.completion_id == winner]
        if len(majority) < len(verdicts):
            skipped["outvoted"] += len(verdicts) - len(majority)
        _, chosen, rejected = majority[0]
        pairs.append(_pair(chosen, chosen.as_answer(), rejected.as_answer(), "pairwise",
                           sorted(v.feedback_id for v, _, _ in majority), rejected.model_version))
    return pairs


def _sibling_pairs(thumbs_by_prompt: dict[str, list[Vote]]) -> list[dict]:
    pairs = []
    for votes in thumbs_by_prompt.values():
        ups = [v for v in votes if v.up]
        downs = [v for v in votes if not v.up]
        for up in ups:
            for down in downs:
                if up.a.completion_id != down.a.completion_id:
                    pairs.append(_pair(up.a, up.a.as_answer(), down.a.as_answer(), "sibling_thumbs",
                                       sorted({up.feedback_id, down.feedback_id}), down.a.model_version))
    return pairs


def _pair(answer: Answer, chosen: Any, rejected: Any, source: str, feedback_ids: Sequence[int],
          rejected_version: str | None = None) -> dict:
    return {"prompt": answer.prompt, "chosen": chosen, "rejected": rejected, "feedback_ids": list(feedback_ids),
            "source": source, "model_version": answer.model_version, "rejected_model_version": rejected_version or answer.model_version}


def _kto(v: Vote, answer: Answer, label: bool) -> dict:
    return {"prompt": answer.prompt, "completion": answer.as_answer(), "label": label, "feedback_ids": [v.feedback_id],
            "source": v.kind, "model_version": answer.model_version}


def _bandit(v: Vote, skipped: Counter) -> list[dict]:
    """A prediction vote → its bandit records (see the module's docstring)."""
    p = v.prediction
    if p is None:
        skipped["no_prediction"] += 1
        return []
    provenance = {"model_version": p.model_version, "prediction_id": p.prediction_id, "feedback_ids": [v.feedback_id],
                  "user": v.user, "source": "prediction"}
    if p.task != "ner":
        record = {"text": p.text, "shown": p.shown, "propensity": p.propensity, "reward": 1.0 if v.correct else 0.0}
        if v.correct:
            record["label"] = p.shown
        elif v.label is not None:
            record["label"] = v.label
        return [{**record, **provenance}]
    shown = p.entities or []
    if v.correct:  # every shown entity right
        verdicts = {i: {"index": i, "correct": True} for i in range(len(shown))}
    else:
        verdicts = {e["index"]: e for e in v.entities or []}
    if not shown:
        skipped["no_shown_entities"] += 1
        return []
    if not verdicts:  # wrong somewhere, but the user did not say which entity
        skipped["unjudged_entities"] += 1
        return []
    records = []
    for i, verdict in sorted(verdicts.items()):
        entity = shown[i]
        record = {"tokens": p.tokens, "start": entity["word_start"], "end": entity["word_end"], "shown": entity["type"],
                  "propensity": entity["propensity"], "reward": 1.0 if verdict["correct"] else 0.0}
        if verdict["correct"]:
            record["label"] = entity["type"]
        elif verdict.get("label") is not None:
            record["label"] = verdict["label"]
        records.append({**record, **provenance})
    return records


def _dedupe(records: list[dict], fields: tuple[str, ...], skipped: Counter, name: str) -> list[dict]:
    seen: dict[str, dict] = {}
    for r in records:
        key = repr((r["prompt"], *(r[f] for f in fields)))
        if key in seen:
            seen[key]["feedback_ids"] = sorted(set(seen[key]["feedback_ids"]) | set(r["feedback_ids"]))
            skipped[f"duplicate_{name}"] += 1
        else:
            seen[key] = r
    return list(seen.values())


def _differs(pair: dict, skipped: Counter) -> bool:
    if pair["chosen"] == pair["rejected"]:
        skipped["identical_answers"] += 1
        return False
    return True
