"""Generation on an external OpenAI-compatible server (``rollout.engine: openai``), against real
servers started here as processes: ``alignloop serve`` (token ids and sampling log-probs, the
weights deployed through ``/admin/deploy``) and ``transformers serve`` (text only, the weights
named by folder in each request).

The engine returns the local engine's ``Generation``s with the server's log-probs, which match the
trainer's forward; an answer from other weights than published is refused; a GRPO run whose
rollouts all come from the server raises the held-out reward, with a new served version after
every update; bad settings fail as ConfigErrors naming the key.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from alignloop.cli import main
from alignloop.config import ModelConfig, RolloutConfig, SamplingConfig
from alignloop.errors import ConfigError
from alignloop.runs import read_metrics
from conftest import GOOD, WORDS, alignloop_command, wait_for

TRANSFORMERS = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "transformers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


@contextmanager
def process(args: list[str], url: str) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: answers(url), proc, timeout=120)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def alignloop_server(word_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``alignloop serve`` of the word model as "p", with an admin's key (deploying needs one) and no rate limits."""
    folder = tmp_path_factory.mktemp("rollout-serve")
    db = f"sqlite:///{folder}/feedback.db"
    subprocess.run(alignloop_command("db", "upgrade", "--db", db), check=True, capture_output=True)
    key = subprocess.run(alignloop_command("users", "add", "trainer", "--admin", "--db", db), check=True,
                         capture_output=True, text=True).stdout.strip()
    port = free_port()
    with process(alignloop_command("serve", "--model", f"p={word_model_dir}", "--db", db, "--port", str(port),
                                   "--rate-limit-per-minute", "0", "--tokens-per-minute", "0"), f"http://127.0.0.1:{port}/health"):
        yield {"url": f"http://127.0.0.1:{port}/v1", "key": key}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """test_rl's task: the share of good words (the first 10% of the vocabulary) in a completion."""
    folder = tmp_path_factory.mktemp("rollout-task")
    rng = random.Random(0)
    for name, n in (("train", 64), ("heldout", 24)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=4))}) + "\n"
                                                      for _ in range(n)))
    (folder / "rewards.py").write_text(
        f"GOOD = set({GOOD!r})\n"
        "def good_share(prompts, completions, **fields):\n"
        "    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]\n")
    return {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl", "rewards": folder / "rewards.py"}


def grpo_args(policy: Path, task: dict, out: Path, url: str, *extra: str) -> list[str]:
    return ["grpo", f"--model.name_or_path={policy}", f"--data.path={task['train']}", f"--rl.reward={task['rewards']}:good_share",
            f"--rl.eval_prompts={task['heldout']}", f"--run.output_dir={out}", "--sampling.max_new_tokens=12",
            "--train.lr=1e-2", "--train.batch_size=4", "--rl.group_size=4", "--train.save_every=0", "--train.seed=0",
            "--rollout.engine=openai", f"--rollout.url={url}", *extra]


def load_word_policy(folder: Path) -> tuple:
    from alignloop.models.load import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    return load_causal_lm(ModelConfig(name_or_path=str(folder)), tokenizer, seed=0), tokenizer


def test_the_engine_returns_generations_with_the_servers_exact_logprobs(alignloop_server: dict, word_model_dir: Path) -> None:
    from alignloop.rollout.remote import ServerEngine
    from alignloop.rollout.scoring import token_logprobs

    engine = ServerEngine(RolloutConfig(engine="openai", url=alignloop_server["url"], api_key=alignloop_server["key"],
                                        model="p", weight_sync="none"))
    assert [card["id"] for card in engine.check()] == ["p"]
    model, tokenizer = load_word_policy(word_model_dir)
    prompts = ["lok lam fuk dor"] * 3 + ["bis"] * 2 + ["gat kin"]
    generation = engine.generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=20, temperature=1.0))
    assert engine.features.token_prompts and engine.features.honours_n and engine.features.token_ids
    assert generation.exact_logprobs and len(generation.completion_ids) == len(prompts) == len(generation.finished)
    assert generation.prompt_ids[0] == tokenizer("lok lam fuk dor")["input_ids"]
    for ids, logps, finished, text in zip(generation.completion_ids, generation.logprobs, generation.finished, generation.completions):
        assert len(ids) == len(logps) and 0 < len(ids) <= 20 and all(lp <= 0 for lp in logps)
        assert finished == (ids[-1] == tokenizer.eos_token_id)  # through the stop token, as the local engine gives it
        assert text == tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
    assert len({tuple(ids) for ids in generation.completion_ids[:3]}) == 3  # a group's samples differ
    trainer = token_logprobs(model, generation.prompt_ids, generation.completion_ids, 8)
    gap = [abs(a - b) for engine_row, trainer_row in zip(generation.logprobs, trainer) for a, b in zip(engine_row, trainer_row)]
    assert max(gap) < 1e-4, max(gap)  # the same fp32 model: π_old from the engine is exact

    from alignloop.rollout.remote import RolloutError

    engine.expect({"model": "p", "version": "0000000000000000"})
    with pytest.raises(RolloutError, match="not the published 0000000000000000"):
        engine.generate(model, tokenizer, prompts[:1], SamplingConfig(max_new_tokens=2))


def test_grpo_on_alignloop_serve_raises_the_reward_with_a_new_version_after_each_update(
        alignloop_server: dict, word_model_dir: Path, task: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNLOOP_ROLLOUT_KEY", alignloop_server["key"])
    steps = 30
    assert main(grpo_args(word_model_dir, task, tmp_path, alignloop_server["url"], f"--train.max_steps={steps}",
                          f"--train.eval_every={steps}")) == 0
    last = read_metrics(tmp_path / "grpo" / "metrics.jsonl")[-1]
    assert last["eval/reward"] > last["eval/start_reward"] + 0.2, (last["eval/start_reward"], last["eval/reward"])
    weights = sorted((tmp_path / "grpo" / "rollout-weights").iterdir(), key=lambda p: int(p.name[5:]))
    assert [p.name for p in weights] == [f"step-{steps - 2}", f"step-{steps - 1}"]  # rollout.keep_weights=2
    published = [json.loads((p / "rollout.json").read_text()) for p in weights]
    # Every rollout came from its own deployed version: one registered version per step, and the
    # server now answers with the last one published.
    auth = {"Authorization": f"Bearer {alignloop_server['key']}"}
    base = alignloop_server["url"][: -len("/v1")]
    registered = {m["version"] for m in httpx.get(f"{base}/admin/models", headers=auth).json()["data"]}
    assert len(registered) >= steps  # step 0's weights are the served "p"'s, registered under that name
    served = {m["id"]: m["version"] for m in httpx.get(f"{alignloop_server['url']}/models", headers=auth).json()["data"]}
    assert served["rollout-grpo"] == published[-1]["version"] != published[0]["version"]


def test_the_gap_between_engine_and_trainer_logprobs_is_logged_when_pi_old_is_recomputed(
        alignloop_server: dict, word_model_dir: Path, task: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGNLOOP_ROLLOUT_KEY", alignloop_server["key"])
    assert main(grpo_args(word_model_dir, task, tmp_path, alignloop_server["url"], "--train.max_steps=3",
                          "--rollout.old_logprobs=trainer", "--run.name=gap")) == 0
    rows = read_metrics(tmp_path / "gap" / "metrics.jsonl")
    assert len(rows) == 3 and all(0 <= row["rollout/logprob_gap"] <= row["rollout/logprob_gap_max"] < 1e-4 for row in rows)


@pytest.mark.slow  # transformers serve loads each step's folder in a new process: ~5 s a step
def test_grpo_on_transformers_serve_reloads_each_published_folder(word_model_dir: Path, task: dict, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    with process([str(TRANSFORMERS), "serve", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
                  "--model-timeout", "15"], f"{url}/models"):
        steps = 20
        assert main(grpo_args(word_model_dir, task, tmp_path, url, "--rollout.weight_sync=model_path",
                              f"--train.max_steps={steps}", f"--train.eval_every={steps}", "--train.lr=2e-2")) == 0
        last = read_metrics(tmp_path / "grpo" / "metrics.jsonl")[-1]
        assert last["eval/reward"] > last["eval/start_reward"] + 0.15, (last["eval/start_reward"], last["eval/reward"])
        # The server answers from the folder named, not a model it cached: its greedy completion of
        # the last published folder is the local greedy completion of those weights.
        from alignloop.rollout.generate import generate

        folder = tmp_path / "grpo" / "rollout-weights" / f"step-{steps - 1}"
        model, tokenizer = load_word_policy(folder)
        prompts = [" ".join(WORDS[i:i + 3]) for i in range(0, 30, 10)]
        greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
        local = generate(model, tokenizer, prompts, greedy).completions
        served = [httpx.post(f"{url}/completions", json={"model": str(folder.resolve()), "prompt": p, "max_tokens": 8,
                                                         "temperature": 0.0}, timeout=60).json()["choices"][0]["text"].strip()
                  for p in prompts]
        assert served == local


@pytest.mark.parametrize("options, message", [
    (("--rollout.engine=openai",), "rollout.url: rollout.engine=openai needs the server's base URL"),
    (("--rollout.engine=openai", "--rollout.url=http://127.0.0.1:1/"), "rollout.url: 'http://127.0.0.1:1' should be"),
    (("--rollout.engine=openai", "--rollout.url=http://127.0.0.1:1/v1"), "rollout.url: cannot reach http://127.0.0.1:1/v1/models"),
    (("--rollout.engine=vllm",), "rollout.engine: 'vllm' is not one of local, openai"),
    (("--rollout.weight_sync=nccl",), "rollout.weight_sync: 'nccl' is not one of deploy, model_path, none"),
    (("--rollout.concurrency=0",), "rollout.concurrency and rollout.keep_weights must be ≥ 1"),
    (("--rollout.engine=openai", "--rollout.url=http://127.0.0.1:1/v1", "--sampling.top_k=5"), "sampling.top_k=5: the OpenAI completions API has no top-k"),
])
def test_bad_rollout_settings_are_config_errors_naming_the_key(options: tuple, message: str, word_model_dir: Path, task: dict,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [a for a in grpo_args(word_model_dir, task, tmp_path, "x") if not a.startswith("--rollout.")]
    assert main([*args, *options, "--train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_wrong_key_is_named_before_any_model_loads(alignloop_server: dict, word_model_dir: Path, task: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(grpo_args(word_model_dir, task, tmp_path, alignloop_server["url"], "--rollout.api_key=wrong", "--train.max_steps=1")) == 2
    assert "rollout.api_key:" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="rollout.api_key: env: needs a variable name"):
        RolloutConfig(api_key="env:")
