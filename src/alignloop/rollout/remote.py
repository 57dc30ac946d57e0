"""Generation on an OpenAI-compatible server (``rollout.engine: openai``): ``vllm serve``, SGLang,
TGI, ``transformers serve`` or ``alignloop serve``, behind the same call as the local engine.

:meth:`ServerEngine.generate` takes what :func:`alignloop.rollout.generate.generate` takes and
returns the same :class:`~alignloop.rollout.generate.Generation`: each prompt is encoded by the
trainer (chat template included, once) and sent to ``POST /v1/completions``, as token ids where
the server takes them (vLLM, alignloop serve) and as the decoded text where it does not; a run
of equal prompts (an RL group) is one request with ``n`` samples where the server honours ``n``.
Requests run ``rollout.concurrency`` at a time; 429 and 503 are retried after ``Retry-After``.

**Token ids and log-probs.** The request asks for ``logprobs`` and, as vLLM's extension,
``return_tokens_as_token_ids`` (tokens come back as ``"token_id:123"``): then the completion's
ids are exactly what the server sampled and ``logprobs`` are its sampling log-probs, and
:attr:`Generation.exact_logprobs` is true. A server without them (``transformers serve`` returns
neither) gets the plain request; its text is re-tokenised with the policy's tokenizer (plus the
EOS token when it stopped), which need not be the ids it sampled, and ``exact_logprobs`` is
false with no log-probs: the trainer then computes π_old with a forward pass
(``train/rl.py``'s ``make_experience``). What a server takes is found once, by
:meth:`ServerEngine.probe` (a 2-token request), and logged.

Even exact ids can carry log-probs that are not π_old's: vLLM returns the raw model's log-probs
(temperature 1) unless started with ``--logprobs-mode processed_logprobs``, and an engine in
bf16 with its own kernels differs from the trainer's fp32 forward by numerics alone.
``rollout.old_logprobs: trainer`` recomputes π_old always and logs ``rollout/logprob_gap``, the
mean |engine − trainer| per token, so the gap can be measured before it is trusted.

**Which weights answered.** :meth:`publish` tells the server about a folder of new weights
(``rollout.weight_sync``): ``deploy`` posts it to alignloop serve's ``/admin/deploy`` and
expects the version that returns in every answer's ``model_version``; ``model_path`` names the
folder as each request's ``model`` (``transformers serve`` loads a model by the name it is
given, a new folder per step) and expects it back in every answer's ``model``. An answer from
other weights raises :class:`RolloutError`: a rollout from stale weights would train silently
off-policy.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from alignloop.config import RolloutConfig, SamplingConfig, secret
from alignloop.errors import AlignloopError, ConfigError
from alignloop.rollout.generate import SEED_STRIDE, Generation, Prompt, default_stop_token_ids, encode_prompts

log = logging.getLogger("alignloop")

TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling
RETRY_STATUSES = (429, 503)


class RolloutError(AlignloopError):
    """The generation server failed a rollout or answered from other weights than published."""


# The fields a request adds to OpenAI's plain ones, most useful first; :meth:`ServerEngine.probe`
# keeps the first a server accepts (a server refuses, 400/422, a field it does not know).
EXTRA_FIELDS = {
    "logprobs": {"logprobs": 1, "return_tokens_as_token_ids": True},  # vLLM, alignloop serve: ids and log-probs
    # transformers serve: its sampling switch. It decodes greedily, whatever the temperature, unless
    # the model's generation_config (or the request's) says do_sample.
    "generation_config": {"generation_config": '{"do_sample": true}'},
    "none": {},
}


@dataclass(frozen=True)
class ServerFeatures:
    """What a server does with the fields a plain OpenAI completion request lacks (from :meth:`ServerEngine.probe`)."""

    token_prompts: bool  # takes the prompt as a list of token ids
    extra: str  # the key of EXTRA_FIELDS it accepts
    honours_n: bool  # returns n choices for n
    token_ids: bool  # returns each sampled token as "token_id:ID" with its log-prob

    def describe(self) -> str:
        return (f"prompts as {'token ids' if self.token_prompts else 'text'}, n {'honoured' if self.honours_n else 'ignored'}, "
                f"{'sampled token ids and log-probs' if self.token_ids else 'text only (re-tokenised; π_old recomputed)'}, "
                f"extra fields: {self.extra}")


def api_key(config: RolloutConfig) -> str | None:
    """``rollout.api_key``, or the environment variable it names as ``env:NAME`` (None when unset)."""
    return secret(config.api_key, "rollout.api_key")


def check_sampling(sampling: SamplingConfig) -> None:
    """Refuse sampling settings the OpenAI API cannot carry (it has no top-k, and no way to forbid stopping)."""
    if sampling.top_k > 0:
        raise ConfigError(f"sampling.top_k={sampling.top_k}: the OpenAI completions API has no top-k; use top_p or "
                          "rollout.engine=local")
    if not sampling.stop_at_eos:
        raise ConfigError("sampling.stop_at_eos=false: an OpenAI-compatible server always stops at its stop tokens; "
                          "use rollout.engine=local")


def server_engine(config: RolloutConfig, sampling: SamplingConfig, run_name: str) -> "ServerEngine | None":
    """The engine of ``rollout.engine: openai``, its sampling settings and the server checked
    before anything heavy loads (RL and evaluate alike); None for ``local``."""
    if config.engine != "openai":
        return None
    check_sampling(sampling)
    engine = ServerEngine(config, default_model=f"rollout-{run_name}")
    engine.check()
    return engine


class ServerEngine:
    """An OpenAI-compatible server as the generation engine; see the module docstring."""

    def __init__(self, config: RolloutConfig, default_model: str | None = None) -> None:
        self.config = config
        self.model = config.model or default_model  # what requests name
        self.expected_version: str | None = None  # alignloop serve's model_version every answer must carry
        self.features: ServerFeatures | None = None

    def client(self) -> httpx.Client:
        """A connection pool for one call (check, probe, publish, generate): nothing stays open between calls."""
        key = api_key(self.config)
        return httpx.Client(base_url=self.config.url or "", timeout=self.config.timeout_s,
                            headers={"Authorization": f"Bearer {key}"} if key else {})

    # -- checks -------------------------------------------------------------------------------
    def check(self) -> list[dict]:
        """The server answers ``GET /v1/models`` (so ``rollout.url`` and the key are right); its
        model cards. Called before anything heavy is loaded."""
        url = self.config.url
        try:
            with self.client() as client:
                response = client.get("/models", timeout=min(self.config.timeout_s, 30.0))
        except httpx.HTTPError as e:
            raise ConfigError(f"rollout.url: cannot reach {url}/models ({type(e).__name__}: {e}); is the server running?") from None
        if response.status_code in (401, 403):
            raise ConfigError(f"rollout.api_key: {url}/models answered {response.status_code} ({_reason(response)}); "
                              "set rollout.api_key (or env:NAME)")
        if response.status_code != 200:
            raise ConfigError(f"rollout.url: {url}/models answered {response.status_code} ({_reason(response)}); "
                              "is it an OpenAI-compatible server's /v1?")
        try:
            cards = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"rollout.url: {url}/models did not answer an OpenAI model list") from None
        if self.model is None and self.config.weight_sync == "none":
            ids = [card.get("id") for card in cards]
            if len(ids) != 1:
                raise ConfigError(f"rollout.model: the server at {url} serves {ids}; name the one to use")
            self.model = ids[0]
        return cards

    def probe(self, model: Any, tokenizer: Any) -> ServerFeatures:
        """Find out, with 2-token requests, whether the server takes token-id prompts, which of
        :data:`EXTRA_FIELDS` (vLLM's ``return_tokens_as_token_ids`` with ``logprobs`` first), and ``n``."""
        ids = encode_prompts(tokenizer, ["Hello"])[0] or [default_stop_token_ids(model, tokenizer)[0]]
        base = {"model": self.model, "max_tokens": 2, "temperature": 1.0, "seed": 0, "n": 2}
        for extra, as_ids in itertools.product(EXTRA_FIELDS, (True, False)):
            with self.client() as client:
                response = self._post(client, {**base, "prompt": ids if as_ids else tokenizer.decode(ids), **EXTRA_FIELDS[extra]})
            if response.status_code == 200:
                choices = response.json().get("choices") or []
                tokens = ((choices[0].get("logprobs") or {}).get("tokens") or []) if choices else []
                self.features = ServerFeatures(as_ids, extra, len(choices) == 2,
                                               bool(tokens) and all(str(t).startswith(TOKEN_ID_PREFIX) for t in tokens))
                log.info("rollout: %s at %s: %s", self.model, self.config.url, self.features.describe())
                return self.features
            if response.status_code not in (400, 422):  # not a refused field: no other form will do better
                break
        raise RolloutError(f"rollout: {self.config.url}/completions refused a 2-token completion of model {self.model!r}: "
                           f"{response.status_code} {_reason(response)}")

    # -- weights ------------------------------------------------------------------------------
    def publish(self, folder: Path | str, name: str) -> dict[str, str | None]:
        """Make the server answer from the weights in ``folder`` (a model folder, or a Hub id the
        server can load) per ``rollout.weight_sync``; returns what every later answer must carry,
        ``{"model": ..., "version": ...}``. Call it on one process and hand the result to every
        process's :meth:`expect`."""
        sync = self.config.weight_sync
        path = str(Path(folder).resolve()) if Path(folder).exists() else str(folder)
        if sync == "model_path":
            return {"model": path, "version": None}
        if sync == "none":
            return {"model": self.model, "version": None}
        target = self.model or name
        url = self.config.url[: -len("/v1")] + "/admin/deploy"  # type: ignore[index]
        try:
            with self.client() as client:
                response = client.post(url, json={"name": target, "path": path})
        except httpx.HTTPError as e:
            raise RolloutError(f"rollout.weight_sync=deploy: {url} failed ({type(e).__name__}: {e})") from None
        if response.status_code != 200:
            hint = "; deploying needs an admin's key in rollout.api_key" if response.status_code in (401, 403) else (
                "; deploy is alignloop serve's: for another server use weight_sync=model_path or none" if response.status_code == 404 else "")
            raise RolloutError(f"rollout.weight_sync=deploy: {url} answered {response.status_code} ({_reason(response)}){hint}")
        version = response.json()["version"]
        log.info("rollout: %s now serves %s (version %s, was %s)", target, folder, version, response.json().get("previous_version"))
        return {"model": target, "version": version}

    def expect(self, published: dict[str, str | None]) -> None:
        """From now on, request ``published["model"]`` and refuse answers from any other weights."""
        self.model, self.expected_version = published["model"], published["version"]

    # -- generation ---------------------------------------------------------------------------
    def generate(self, model: Any, tokenizer: Any, prompts: Sequence[Prompt], sampling: SamplingConfig,
                 batch_size: int | None = None, sample_ids: Sequence[int] | None = None, progress: bool = False,
                 stop_token_ids: Sequence[int] | None = None) -> Generation:
        """Complete every prompt on the server; the arguments and the result are those of
        :func:`alignloop.rollout.generate.generate` (``model`` gives only the stop tokens;
        ``batch_size`` and ``progress`` are the server's business). The seed of a request is a
        function of ``sampling.seed`` and its first sample id, so a rerun asks the same."""
        check_sampling(sampling)
        if self.model is None:
            raise RolloutError("rollout: no model to request yet: publish weights first, or set rollout.model")
        features = self.features or self.probe(model, tokenizer)
        n = len(prompts)
        sample_ids = list(range(n)) if sample_ids is None else list(sample_ids)
        prompt_ids = encode_prompts(tokenizer, prompts)
        stops = list(stop_token_ids) if stop_token_ids is not None else default_stop_token_ids(model, tokenizer)
        # Runs of the same prompt (an RL group's samples sit next to each other): one request with n.
        requests: list[tuple[int, int]] = []  # (first row, rows)
        start = 0
        while start < n:
            end = start + 1
            while features.honours_n and end < n and prompt_ids[end] == prompt_ids[start]:
                end += 1
            requests.append((start, end - start))
            start = end
        bodies = [self._body(prompt_ids[first], tokenizer, sampling, rows, sample_ids[first], features) for first, rows in requests]
        with self.client() as client, ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(bodies)) or 1) as pool:
            answers = list(pool.map(lambda body: self._complete(client, body), bodies))

        completion_ids: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished = [False] * n
        texts = [""] * n
        exact = features.token_ids
        for (first, rows), answer in zip(requests, answers):
            choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != rows:
                raise RolloutError(f"rollout: asked {self.config.url} for {rows} completions (n), got {len(choices)}")
            for offset, choice in enumerate(choices):
                row = first + offset
                ids, logps, ok = parse_choice(choice, tokenizer, stops, features.token_ids, sampling.max_new_tokens)
                exact = exact and ok
                completion_ids[row], logprobs[row] = ids, logps
                finished[row] = choice.get("finish_reason") == "stop"
                texts[row] = choice.get("text") or ""
        if exact:  # the text as the local engine makes it, from the ids (stop token and special tokens left out)
            texts = tokenizer.batch_decode([ids[:-1] if ids and ids[-1] in stops else ids for ids in completion_ids],
                                           skip_special_tokens=True)
        return Generation(prompt_ids, completion_ids, texts, logprobs, finished, exact_logprobs=exact)

    def _body(self, prompt: list[int], tokenizer: Any, sampling: SamplingConfig, rows: int, first_id: int,
              features: ServerFeatures) -> dict:
        body = {"model": self.model, "prompt": prompt if features.token_prompts else tokenizer.decode(prompt),
                "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "seed": (sampling.seed * SEED_STRIDE + first_id) % 2**31, "n": rows}
        body.update(EXTRA_FIELDS[features.extra])
        if features.extra == "generation_config":
            body["generation_config"] = json.dumps({"do_sample": sampling.temperature > 0})
        return body

    def _post(self, client: httpx.Client, body: dict) -> httpx.Response:
        """POST /v1/completions, retrying 429/503 after their Retry-After until ``rollout.timeout_s``."""
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            try:
                response = client.post("/completions", json=body)
            except httpx.HTTPError as e:
                raise RolloutError(f"rollout: {self.config.url}/completions failed ({type(e).__name__}: {e})") from None
            if response.status_code not in RETRY_STATUSES or time.monotonic() > deadline:
                return response
            time.sleep(min(float(response.headers.get("Retry-After") or 1), max(0.0, deadline - time.monotonic())))

    def _complete(self, client: httpx.Client, body: dict) -> dict:
        response = self._post(client, body)
        if response.status_code != 200:
            raise RolloutError(f"rollout: {self.config.url}/completions answered {response.status_code} for model "
                               f"{body['model']!r}: {_reason(response)}")
        answer = response.json()
        self._check_weights(answer)
        return answer

    def _check_weights(self, answer: dict) -> None:
        """The answer came from the published weights (see the module docstring)."""
        if self.expected_version is not None and answer.get("model_version") != self.expected_version:
            raise RolloutError(f"rollout: {self.config.url} answered from version {answer.get('model_version')!r} of "
                               f"{self.model!r}, not the published {self.expected_version}: another deploy replaced it?")
        if self.config.weight_sync == "model_path":
            served = str(answer.get("model") or "")
            if served != self.model and not served.startswith(f"{self.model}@"):  # transformers serve: "PATH@main"
                raise RolloutError(f"rollout: {self.config.url} answered from model {served!r}, not the published {self.model}")


def parse_choice(choice: dict, tokenizer: Any, stops: Sequence[int], token_ids: bool,
                 max_tokens: int) -> tuple[list[int], list[float], bool]:
    """A choice's completion ids (through the stop token when it stopped, as the local engine
    gives them), their log-probs, and whether both are exactly what the server sampled.
    Re-tokenised text can come out longer than the ``max_tokens`` the server sampled (a
    byte-level BPE need not re-merge a random model's bytes as sampled): it is cut there, so a
    completion and its prompt stay within what the trainer scores."""
    stopped = choice.get("finish_reason") == "stop"
    lp = choice.get("logprobs") or {}
    tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
    if token_ids and len(tokens) == len(values) and all(str(t).startswith(TOKEN_ID_PREFIX) for t in tokens):
        ids = [int(str(t)[len(TOKEN_ID_PREFIX):]) for t in tokens]
        logprobs = [float(v) for v in values]
        if stopped and (not ids or ids[-1] not in stops):  # a server that leaves the stop token out: its log-prob is unknown
            return ids + [stops[0]] if stops else ids, [], False
        return ids, logprobs, True
    ids = list(tokenizer(choice.get("text") or "", add_special_tokens=False)["input_ids"])[:max_tokens]
    if stopped and stops:
        ids = ids[: max_tokens - 1] + [stops[0]]
    return ids, [], False


def _reason(response: httpx.Response) -> str:
    """The error message of a JSON error body (OpenAI's ``error.message``, FastAPI's ``detail``), else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])[:300]
    return response.text[:200]
