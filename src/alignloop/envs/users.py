"""Simulated users: a population with a hidden preference that talks to a running alignloop
server through its real HTTP API (OpenAI-compatible chat plus the feedback endpoints), each user
with their own API key, and gives the feedback a person would: thumbs, ratings, A/B comparisons
and corrections.

The utility stays inside this module: the server and the trainer only ever see the feedback.
Noise is Bradley–Terry with a temperature (see :func:`~alignloop.envs.preferences.bradley_terry`);
a share of the users are trolls who vote at random (``"random"``) or against their preference
(``"contrary"``).
"""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from alignloop.envs.preferences import MixturePreference, Preference, bradley_terry
from alignloop.errors import ConfigError

FEEDBACK_MIX = {"pairwise": 0.4, "thumbs": 0.3, "rating": 0.2, "correction": 0.1}


@dataclass
class SimulatedUser:
    """One user: a name and key for the API, a hidden preference, and how they give feedback."""

    name: str
    key: str
    preference: Preference
    temperature: float = 0.05  # Bradley–Terry noise on utility differences
    troll: Optional[Literal["random", "contrary"]] = None
    feedback_mix: dict[str, float] = field(default_factory=lambda: dict(FEEDBACK_MIX))

    def _utility(self, prompt: str, answer: str) -> float:
        u = self.preference.utility(prompt, answer)
        return 1 - u if self.troll == "contrary" else u

    def prefers_a(self, prompt: str, a: str, b: str, rng: random.Random) -> bool:
        """Whether this user votes for ``a`` over ``b``."""
        if self.troll == "random":
            return rng.random() < 0.5
        return rng.random() < bradley_terry(self._utility(prompt, a), self._utility(prompt, b), self.temperature)

    def thumbs_up(self, prompt: str, answer: str, rng: random.Random) -> bool:
        """Up with probability σ((u − ½)/T): a coin flip for a middling answer."""
        if self.troll == "random":
            return rng.random() < 0.5
        return rng.random() < bradley_terry(self._utility(prompt, answer), 0.5, self.temperature)

    def rating(self, prompt: str, answer: str, rng: random.Random) -> int:
        """1–5: the utility on that scale plus noise of the same temperature."""
        if self.troll == "random":
            return rng.randint(1, 5)
        score = 1 + 4 * self._utility(prompt, answer) + rng.gauss(0, 4 * self.temperature)
        return int(min(5, max(1, round(score))))

    def correction(self, prompt: str, answer: str) -> str:
        """The answer rewritten toward this user's taste (a troll rewrites it into noise)."""
        if self.troll is not None:
            return "whatever."
        return self.preference.improve(prompt, answer)


def make_population(preference: Preference, size: int, add_user: Callable[[str], str], troll_share: float = 0.0,
                    troll_kind: Literal["random", "contrary"] = "random", temperature: float = 0.05, seed: int = 0,
                    prefix: str = "sim") -> list[SimulatedUser]:
    """``size`` users; ``add_user(name) -> key`` registers each with the server's store. A
    mixture preference assigns each user to one of its groups by weight; ``troll_share`` of the
    users (rounded) are trolls."""
    if size < 1:
        raise ConfigError(f"population size must be ≥ 1 (got {size})")
    if not 0 <= troll_share <= 1:
        raise ConfigError(f"troll_share must be in [0, 1] (got {troll_share})")
    rng = random.Random(seed)
    trolls = set(rng.sample(range(size), round(troll_share * size)))
    users = []
    for i in range(size):
        taste = preference
        if isinstance(preference, MixturePreference):
            weights = [w for w, _ in preference.groups]
            taste = rng.choices([p for _, p in preference.groups], weights=weights)[0]
        name = f"{prefix}-{i:03d}-{uuid.uuid4().hex[:6]}"
        users.append(SimulatedUser(name, add_user(name), taste, temperature, troll_kind if i in trolls else None))
    return users


@dataclass
class SessionStats:
    """What a round of simulated use did: completions asked for and feedback given, by kind."""

    completions: int = 0
    feedback: Counter = field(default_factory=Counter)
    utilities: list[float] = field(default_factory=list)  # of the answers users saw, by their own taste

    def as_dict(self) -> dict[str, Any]:
        mean = sum(self.utilities) / len(self.utilities) if self.utilities else None
        return {"completions": self.completions, "feedback": dict(self.feedback), "mean_seen_utility": mean}


def run_session(client: Any, users: Sequence[SimulatedUser], prompts: Sequence[str], model: str, turns_per_user: int,
                seed: int = 0, max_tokens: int = 32, temperature: float = 1.0, concurrent: bool = True) -> SessionStats:
    """Every user chats ``turns_per_user`` times through ``client`` (an ``httpx.Client`` with the
    server's base URL, or FastAPI's TestClient) and gives one piece of feedback per turn, of a
    kind drawn from their ``feedback_mix``. A pairwise turn asks for two samples (``n=2``) and
    shows them in a random order. Raises on any non-2xx answer: a simulation must not hide a
    broken server.

    With ``concurrent`` each user is a thread of their own, as people are (the server batches
    their requests together). Each user draws from their own seeded random stream and every
    request carries its seed, so what is asked, answered and voted does not depend on the
    scheduling."""
    stats = SessionStats()
    lock = threading.Lock()

    def one_user(index: int, user: SimulatedUser) -> None:
        rng = random.Random(f"{seed}/{index}")
        headers = {"Authorization": f"Bearer {user.key}"}
        for _ in range(turns_per_user):
            prompt = prompts[rng.randrange(len(prompts))]
            kind = rng.choices(list(user.feedback_mix), weights=list(user.feedback_mix.values()))[0]
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": temperature, "n": 2 if kind == "pairwise" else 1, "seed": rng.randrange(2**31)}
            answer = _ok(client.post("/v1/chat/completions", json=body, headers=headers)).json()
            choices = [(c["completion_id"], c["message"]["content"]) for c in answer["choices"]]
            (a_id, a), *rest = choices
            feedback: dict[str, Any] = {"kind": kind, "completion_id": a_id}
            if kind == "pairwise":
                b_id, b = rest[0]
                feedback.update(other_completion_id=b_id, verdict="a" if user.prefers_a(prompt, a, b, rng) else "b",
                                left=rng.choice(["a", "b"]))
            elif kind == "thumbs":
                feedback["up"] = user.thumbs_up(prompt, a, rng)
            elif kind == "rating":
                feedback["rating"] = user.rating(prompt, a, rng)
            else:
                feedback["correction"] = user.correction(prompt, a) or a + "."
            _ok(client.post("/v1/feedback", json=feedback, headers={**headers, "Idempotency-Key": uuid.uuid4().hex}))
            with lock:
                stats.completions += len(choices)
                stats.utilities += [user.preference.utility(prompt, text) for _, text in choices]
                stats.feedback[kind] += 1

    if concurrent and len(users) > 1:
        with ThreadPoolExecutor(max_workers=len(users), thread_name_prefix="simulated-user") as pool:
            for done in [pool.submit(one_user, i, user) for i, user in enumerate(users)]:
                done.result()  # the first user's error, if any, is raised here
    else:
        for i, user in enumerate(users):
            one_user(i, user)
    return stats


def _ok(response: Any) -> Any:
    if response.status_code >= 300:
        raise RuntimeError(f"simulated user: {response.request.method} {response.request.url} → {response.status_code}: {response.text[:300]}")
    return response
