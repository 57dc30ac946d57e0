"""Shared fixtures: a hermetic environment, the built-in tokenizer, a tiny local HF model folder
and small helpers for writing data files.

The built-in tokenizer is trained from the chitchat corpus (a few seconds) into
``$ALIGNLOOP_CACHE``; pointing that at a session temp folder trains it once per session and
never touches the user's cache.
"""

from __future__ import annotations

import functools
import json
import random
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import torch

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported, and a test module may
    # import it (through accelerate or transformers) during collection, before any fixture runs.
    os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory) -> Iterable[None]:
    """Offline, single-threaded, with alignloop's cache in a session temp folder."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGNLOOP_CACHE", str(tmp_path_factory.mktemp("alignloop-cache")))
        for name, value in OFFLINE_ENV.items():
            mp.setenv(name, value)
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def builtin_tok() -> Any:
    """The built-in chitchat BPE tokenizer (ChatML template, EOS ``<|endoftext|>``). Shared: do not mutate."""
    from alignloop.models.builtin import builtin_tokenizer

    return builtin_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, builtin_tok: Any) -> Path:
    """A local HF folder: a randomly initialised built-in ``tiny-1m`` (seed 0) and its tokenizer.
    Shared by the session: copy it before changing anything in it."""
    from alignloop.config import ModelConfig
    from alignloop.models.load import load_causal_lm, save_model

    folder = tmp_path_factory.mktemp("tiny-1m") / "model"
    model = load_causal_lm(ModelConfig(name_or_path="tiny-1m"), builtin_tok, seed=0)
    save_model(model, builtin_tok, folder)
    return folder


@pytest.fixture(scope="session")
def no_chat_template_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A copy of ``tiny_model_dir`` whose tokenizer has no chat template.

    transformers 5 saves the template as ``chat_template.jinja`` beside ``tokenizer_config.json``
    (older versions kept it as a ``chat_template`` key inside it): remove both.
    """
    folder = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model with every weight nudged: another version of it (for deploys and rollbacks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignloop.models.load import save_model

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    folder = tmp_path_factory.mktemp("other") / "model"
    save_model(model, AutoTokenizer.from_pretrained(str(tiny_model_dir)), folder)
    return folder


def _write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line; a ``str`` row is written as the raw line (for malformed input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl() -> Callable[[Path, Iterable[Any]], Path]:
    """``write_jsonl(path, rows) -> path``: dicts become JSON lines, strings are written verbatim."""
    return _write_jsonl


@pytest.fixture
def sft_jsonl(tmp_path: Path) -> Path:
    """A small prompt→completion file (8 short records) that fits any built-in model's context."""
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(8)]
    return _write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def chat_jsonl(tmp_path: Path) -> Path:
    """A small chat file (8 records, `messages` with system, user and assistant turns)."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}."},
            ]
        }
        for i in range(8)
    ]
    return _write_jsonl(tmp_path / "chat.jsonl", rows)


def alignloop_command(*args: str) -> list[str]:
    """``python -m alignloop ARGS`` in this interpreter, for tests that need a separate process."""
    return [sys.executable, "-m", "alignloop", *args]


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll until ``predicate()``; fail if ``proc`` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.fixture
def straight_and_killed_runs() -> Callable[..., tuple[list[dict], list[dict]]]:
    """``straight_and_killed_runs(cli_args, out, step, command=alignloop_command)``: run
    ``alignloop CLI_ARGS`` (writing under ``out``) once uninterrupted as ``straight``; once as
    ``killed``, SIGKILLed with every process it started (a crash, no cleanup) as soon as its
    checkpoint ``step`` is complete, then run again to resume. ``command`` makes the command line
    (e.g. under torchrun). Checks the resume happened; returns both runs' ``metrics.jsonl`` rows."""
    from alignloop.runs import read_metrics

    def run(cli_args: list[str], out: Path, step: int,
            command: Callable[..., list[str]] = alignloop_command) -> tuple[list[dict], list[dict]]:
        # The straight and the killed run must multiply with the same kernels: under `auto` each
        # times oneDNN against torch's GEMM itself, and on a CPU where the two are close they can
        # choose differently and round differently. (The resumed process adopts the killed one's
        # choice from the checkpoint: test_train.py::test_a_resume_keeps_the_cpu_kernels_...)
        cli_args = [*cli_args, "--model.cpu_linear=torch"]
        subprocess.run(command(*cli_args, "--run.name=straight"), check=True, capture_output=True)
        proc = subprocess.Popen(command(*cli_args, "--run.name=killed"), stderr=subprocess.PIPE, text=True)
        wait_for(lambda: (out / "killed" / "checkpoints" / f"step-{step}" / "trainer_state.json").is_file(), proc)
        import psutil  # accelerate's dependency

        # The launcher and every worker (torchrun starts its workers in sessions of their own).
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            process.kill()
        proc.communicate()
        assert not (out / "killed" / "final").exists(), "the run finished before it was killed"
        resumed = subprocess.run(command(*cli_args, "--run.name=killed"), capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stderr
        return read_metrics(out / "straight" / "metrics.jsonl"), read_metrics(out / "killed" / "metrics.jsonl")

    return run


# A word-level vocabulary (1 word = 1 token) and its "good" tenth: the shared benchmark's
# online-RL task in miniature, used by the RL and preference tests.
WORDS = [f"{a}{b}{c}" for a in "bdfgklmnprstvz" for b in "aeiou" for c in "kmnrst"][:200]
GOOD = WORDS[:20]


def write_word_task(folder: Path, files: dict[str, list[dict]]) -> dict[str, Path]:
    """``NAME.jsonl`` in ``folder`` for each ``NAME: rows`` of ``files``, and ``rewards.py`` whose
    ``good_share`` rewards a completion's share of ``GOOD`` words; their paths by name (the
    script's is ``"rewards"``)."""
    out = {name: _write_jsonl(folder / f"{name}.jsonl", rows) for name, rows in files.items()}
    out["rewards"] = folder / "rewards.py"
    out["rewards"].write_text(f"GOOD = set({GOOD!r})\n"
                              "def good_share(prompts, completions, **fields):\n"
                              "    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]\n")
    return out


@pytest.fixture(scope="session")
def word_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (2 layers, width 32, seed 0) over ``WORDS`` with a word-level tokenizer
    (``<pad>`` 0, ``<eos>`` 1). Shared by the session: copy it before changing anything in it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("word-model") / "policy"
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PG_URL = os.environ.get("ALIGNLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@functools.cache
def postgres_unreachable() -> str | None:
    """Why the test PostgreSQL cannot be used, or None."""
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as e:
        return f"no PostgreSQL at {PG_URL} ({type(e).__name__}: {str(e).splitlines()[0]}); set ALIGNLOOP_TEST_PG"
    finally:
        engine.dispose()
    return None


@pytest.fixture
def migrated_sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite feedback store, migrated."""
    from alignloop.feedback.store import upgrade

    url = f"sqlite:///{tmp_path}/feedback.db"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterable[str]:
    """An empty database: a SQLite file path under tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    from alignloop.feedback.database import scratch_postgres_schema

    with scratch_postgres_schema(PG_URL, "alignloop_test") as url:
        yield url


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Any:
    """The tiny model behind a test server, as ``tiny`` (one per test module: loading it is the slow part)."""
    from alignloop.serve.engine import ServedModel

    return ServedModel("tiny", str(tiny_model_dir))


@pytest.fixture(scope="module")
def task(word_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The online-RL task of tests/test_rl.py and tests/test_sharded.py: prompt files, the reward and a
    judge, an SFT set, around the shared word-level policy."""
    folder = tmp_path_factory.mktemp("rl-task")
    rng = random.Random(0)
    def prompts(n: int) -> list[dict]:
        return [{"prompt": " ".join(rng.choices(WORDS, k=4))} for _ in range(n)]
    for name, n in (("train", 64), ("heldout", 24)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts(n)))
    (folder / "rewards.py").write_text(
        f"GOOD = set({GOOD!r})\n"
        "def good_share(prompts, completions, **fields):\n"
        "    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]\n"
        "def judge(prompts, a, b, **fields):\n"
        "    # not the training reward: whichever has more good words among its first four\n"
        "    count = lambda c: sum(w in GOOD for w in c.split()[:4])\n"
        "    return [count(x) - count(y) for x, y in zip(a, b)]\n"
    )
    sft = [{"prompt": " ".join(rng.choices(WORDS, k=4)), "completion": " ".join(rng.choices(WORDS[100:], k=8))}
           for _ in range(32)]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return {"policy": word_model_dir, "train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl",
            "rewards": folder / "rewards.py", "sft": folder / "sft.jsonl"}
