"""The closed loop on a tiny model with simulated users talking to a real server over HTTP:
iterations raise the users' hidden utility on held-out prompts (a paired test, not one number) and
the promoted versions carry their lineage; a population of trolls gets its candidate refused; an
interrupted loop continues from the step it was in without writing anything twice."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from scipy import stats

from alignloop.config import LoopConfig, load_config
from alignloop.errors import ConfigError
from alignloop.feedback.store import FeedbackStore
from alignloop.loop import pipeline
from alignloop.loop.pipeline import run_loop

# Small enough for the default suite: ~240 pieces of feedback an iteration, ~260 held-out prompts.
FAST_OPTIONS = [
    "sft.train.lr=2e-3", "sft.train.epochs=3", "sft.train.warmup_steps=0", "sft.train.eval_every=0",
    "sft.train.save_every=0", "sft.data.eval_fraction=0", "sft.train.batch_size=4",
    "dpo.train.lr=3e-4", "dpo.train.epochs=2", "dpo.train.warmup_steps=0", "dpo.train.eval_every=0",
    "dpo.train.save_every=0", "dpo.preference.beta=0.1", "dpo.data.eval_fraction=0",
]


@pytest.fixture(scope="module")
def chat_base_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """v0: the random tiny-1m after a short SFT on chitchat conversations, so it answers in turns
    and ends them (~20 s); a random model's noise leaves a preference little to grip."""
    from alignloop.config import SFTConfig
    from alignloop.train.sft import run_sft

    cfg = load_config(SFTConfig, overrides={
        "run.output_dir": str(tmp_path_factory.mktemp("chat-base")), "run.name": "sft",
        "model.name_or_path": str(tiny_model_dir), "data.max_length": 96, "train.batch_size": 8, "train.max_steps": 150,
        "train.lr": 3e-3, "train.warmup_steps": 0, "train.eval_every": 0, "train.save_every": 0})
    return run_sft(cfg).final_dir


def loop_config(tmp_path: Path, base: Path, **overrides: Any) -> LoopConfig:
    values = {
        "run.output_dir": str(tmp_path / "runs"), "run.name": "loop", "db": f"sqlite:///{tmp_path}/feedback.db",
        "base_model": str(base), "iterations": 2, "recipe": ["sft", "dpo"], "stage_options": FAST_OPTIONS,
        "rules.min_records": 4, "simulation.preference": "sentiment", "simulation.users": 24,
        "simulation.turns_per_user": 10, "evaluate.gate": "win_rate_lower>0.5,kl_per_token<2", "simulation.max_tokens": 16, "simulation.heldout_every": 10,
        "evaluate.sampling.max_new_tokens": 16, "evaluate.sampling.batch_size": 64,
    }
    values.update(overrides)
    return load_config(LoopConfig, overrides=values)


def states(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("iter-*/state.json"))]


def test_iterations_raise_the_hidden_utility_with_lineage(tmp_path: Path, chat_base_dir: Path) -> None:
    cfg = loop_config(tmp_path, chat_base_dir)
    report = run_loop(cfg)
    folder = report.parent
    its = states(folder)
    promoted = [bool(s["steps"]["promote"]["promoted"]) for s in its]
    # One iteration's ~240 votes may not be enough for the gate (measured over seeds: 4 of 6
    # iterations promoted); two iterations must be.
    assert any(promoted), [s["steps"]["evaluate"] for s in its]

    # The deployed version against v0 on held-out prompts no user ever asked: the users' own
    # utility, paired by prompt, is higher (one-sided Wilcoxon), and the win rate's CI is above ½.
    samples = [json.loads(line) for line in (folder / "final-vs-v0" / "samples.jsonl").read_text().splitlines()]
    final = [s["candidate_reward"] for s in samples]
    v0 = [s["baseline_reward"] for s in samples]
    assert stats.wilcoxon(final, v0, alternative="greater").pvalue < 0.01
    verdict = json.loads((folder / "final-vs-v0.json").read_text())
    assert verdict["metrics"]["win_rate_lower"] > 0.5
    held_out = {json.dumps(json.loads(line)["prompt"]) for line in (folder / "prompts" / "heldout.jsonl").read_text().splitlines()}
    asked = {json.dumps(json.loads(line)["prompt"]) for line in (folder / "prompts" / "users.jsonl").read_text().splitlines()}
    assert held_out and not held_out & asked

    with FeedbackStore(cfg.db) as store:
        models = {m["version"]: m for m in store.models()}
        v0_version = json.loads((folder / "loop.json").read_text())["v0"]["version"]
        deployed = v0_version
        for i, s in enumerate(its, start=1):
            version = s["steps"]["register"]["version"]
            assert s["start"]["version"] == deployed
            assert models[version]["parent_version"] == deployed  # each candidate grew from what was deployed
            # Lineage names exactly the feedback rows behind the records the recipe (sft, dpo) trained on.
            records = [json.loads(line) for kind in ("pairs", "sft") for line in
                       (folder / f"iter-{i}" / "datasets" / f"{kind}.jsonl").read_text().splitlines()]
            behind = {fid for r in records for fid in r["feedback_ids"]}
            assert behind and {row["feedback_id"] for row in store.lineage(version)} == behind
            assert models[version]["evaluation"]["passed"] is promoted[i - 1]
            if promoted[i - 1]:
                deployed = version
        assert models[deployed]["deployed"] and not models[v0_version]["deployed"]
        users = {row["user_name"] for row in store.lineage(deployed)}
        assert users and all(deployed in store.reached_by(u) for u in users)
    text = report.read_text()
    assert "## Lineage" in text and (folder / "loop.png").is_file() and "passed" in text


def test_a_population_of_trolls_gets_its_candidate_refused(tmp_path: Path, chat_base_dir: Path) -> None:
    cfg = loop_config(tmp_path, chat_base_dir, iterations=1, **{"simulation.troll_share": 1.0,
                                                                  "simulation.troll_kind": "contrary"})
    run_loop(cfg)
    folder = Path(cfg.run.output_dir) / cfg.run.name
    (state,) = states(folder)
    steps = state["steps"]
    assert steps["train"]["candidate"] is not None  # trolls' feedback did train a candidate…
    assert steps["evaluate"]["passed"] is False  # …which the gate refused
    assert steps["promote"] == {**steps["promote"], "promoted": False, "deployed": state["start"]["version"]}
    with FeedbackStore(cfg.db) as store:
        deployed = [m["version"] for m in store.models() if m["deployed"]]
        refused = store.models()[-1]
    assert deployed == [state["start"]["version"]]
    assert refused["version"] == steps["register"]["version"] and refused["evaluation"]["passed"] is False


@pytest.mark.parametrize("crash_in", ["evaluate", "promote"])
def test_an_interrupted_loop_continues_without_writing_twice(tmp_path: Path, chat_base_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch, crash_in: str) -> None:
    """A crash in ``evaluate`` (after training) or in ``promote`` (after the registry writes): the
    rerun does not collect, export or train again, and the registry holds each row once."""
    cfg = loop_config(tmp_path, chat_base_dir, iterations=1, **{"simulation.users": 6, "simulation.turns_per_user": 6,
                                                                  "evaluate.gate": "win_rate_lower>-1", "evaluate.max_prompts": 32})
    real = getattr(pipeline.Loop, crash_in)

    def crash(self, *args: Any) -> dict:
        real(self, *args)  # the step's work is done (files, registry rows), its marker not yet written
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pipeline.Loop, crash_in, crash)
    with pytest.raises(KeyboardInterrupt):
        run_loop(cfg)
    folder = Path(cfg.run.output_dir) / cfg.run.name
    (before,) = states(folder)
    assert crash_in not in before["steps"] and "train" in before["steps"]
    datasets = {p.name: p.read_bytes() for p in (folder / "iter-1" / "datasets").iterdir()}
    trained = (folder / "iter-1" / "train-dpo" / "final" / "model.safetensors").stat().st_mtime_ns
    with FeedbackStore(cfg.db) as store:
        feedback_rows = len(store.votes())

    monkeypatch.setattr(pipeline.Loop, crash_in, real)
    run_loop(cfg)
    (after,) = states(folder)
    for step in before["steps"]:
        assert after["steps"][step] == before["steps"][step]  # not run again
    assert set(after["steps"]) == set(pipeline.STEPS)
    assert {p.name: p.read_bytes() for p in (folder / "iter-1" / "datasets").iterdir()} == datasets
    assert (folder / "iter-1" / "train-dpo" / "final" / "model.safetensors").stat().st_mtime_ns == trained
    with FeedbackStore(cfg.db) as store:
        assert len(store.votes()) == feedback_rows  # the users did not chat again
        models = store.models()
        assert len(models) == 2  # v0 and the one candidate
        version = after["steps"]["register"]["version"]
        lineage = store.lineage(version)
        assert len(lineage) == len({row["feedback_id"] for row in lineage}) == after["steps"]["register"]["feedback_rows"]
        assert [m["version"] for m in models if m["deployed"]] == [version]


def test_loop_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="recipe: grpo needs a reward stage"):
        load_config(LoopConfig, overrides={"recipe": "grpo"})
    with pytest.raises(ConfigError, match="recipe: unknown stage 'dop'"):
        load_config(LoopConfig, overrides={"recipe": "dop"})
    with pytest.raises(ConfigError, match="stage_options"):
        load_config(LoopConfig, overrides={"stage_options": "lr=1e-4"})


@pytest.mark.parametrize("base", ["shipped", "scratch"])
def test_demo_runs_the_whole_loop(base: str, tmp_path: Path) -> None:
    """`alignloop demo`, shrunk: base model (the shipped one, or built here from nothing), server,
    simulated users, one iteration, the report with the base and final models side by side."""
    from alignloop.cli import main

    scratch = ["--model", "tiny-1m", "--pretrain-steps", "3", "--sft-steps", "3"] if base == "scratch" else []
    assert main(["demo", "--output-dir", str(tmp_path), "--base", base, *scratch,
                 "--preference", "length", "--iterations", "1", "--users", "6", "--turns-per-user", "4"]) == 0
    report = (tmp_path / "demo" / "report.md").read_text()
    for section in ("## The loop", "## Iterations", "## Lineage", "## The base model", "Held-out loss"):
        assert section in report
    losses = re.findall(r"^\| (base \(v0\)|final \(\w+\)) `[^`]+` \| (\d+\.\d+) \|", report, re.M)
    state = json.loads((tmp_path / "demo" / "loop-length" / "iter-1" / "state.json").read_text())
    promoted = state["steps"]["promote"]["promoted"]
    # The final model gets its own row only when a candidate was promoted; v0 otherwise.
    assert [name for name, _ in losses] == ["base (v0)", *([f"final ({state['steps']['promote']['deployed']})"] if promoted else [])]
    assert (tmp_path / "demo" / "pretrain").is_dir() == (base == "scratch")
    assert set(state["steps"]) == set(pipeline.STEPS)
    assert sum(state["steps"]["collect"]["feedback"].values()) == 24


def test_the_loop_drives_a_running_server(tmp_path: Path, chat_base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `server` and `admin_key` the loop uses a server it did not start: the promoted version
    is what that server answers with afterwards, and its registry row points at the loop's run."""
    import httpx

    from alignloop.config import ServeConfig
    from alignloop.loop.server import free_port, local_server

    db = f"sqlite:///{tmp_path}/feedback.db"
    serve = ServeConfig(models=[f"policy={chat_base_dir}"], db=db, port=free_port())
    with local_server(serve) as server:
        cfg = loop_config(tmp_path, chat_base_dir, iterations=1, server=server.url, admin_key=server.admin_key,
                          **{"simulation.users": 6, "simulation.turns_per_user": 4,
                                            "evaluate.gate": "win_rate_lower>-1", "evaluate.max_prompts": 32})
        run_loop(cfg)
        (state,) = states(Path(cfg.run.output_dir) / cfg.run.name)
        promoted = state["steps"]["promote"]
        assert promoted["promoted"] and promoted["deployed"] == state["steps"]["register"]["version"]
        assert server.served_version("policy") == promoted["deployed"]
        user_key = json.loads((Path(cfg.run.output_dir) / cfg.run.name / "loop.json").read_text())["users"][0]["key"]
        answer = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {user_key}"},
                            json={"model": "policy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).json()
        assert answer["model_version"] == promoted["deployed"]
        # Rolling back is one command: the running server serves v0 again and the registry says so.
        from alignloop.cli import main

        v0 = state["start"]["version"]
        assert main(["deploy", v0, "--db", db, "--server", server.url, "--admin-key", server.admin_key]) == 0
        assert server.served_version("policy") == v0
        with FeedbackStore(db) as store:
            assert [m["version"] for m in store.models() if m["deployed"]] == [v0]
    monkeypatch.delenv("ALIGNLOOP_ADMIN_KEY", raising=False)
    with pytest.raises(ConfigError, match="admin_key"):
        run_loop(loop_config(tmp_path, chat_base_dir, server="http://127.0.0.1:9", admin_key=None))


@pytest.mark.parametrize(("window", "expected"), [("new", "t3"), ("since_promotion", "t1"), ("all", None)])
def test_export_window_opens_after_the_previous_iteration_or_promotion(tmp_path: Path, window: str, expected: str | None) -> None:
    """Iteration 4 after a promotion in 1 and refusals in 2 and 3: `new` reads from 3's export on,
    `since_promotion` from 1's (the votes on the model the gate kept still count), `all` from the start."""
    for i, promoted in ((1, True), (2, False), (3, False)):
        (tmp_path / f"iter-{i}").mkdir()
        (tmp_path / f"iter-{i}" / "state.json").write_text(json.dumps(
            {"steps": {"export": {"until": f"t{i}"}, "promote": {"promoted": promoted}}}))
    cfg = load_config(LoopConfig, overrides={"rules.window": window})
    assert pipeline.Loop(cfg, tmp_path, server=None, store=None)._window_start(4) == expected


def test_a_reward_model_then_grpo_recipe(tmp_path: Path, chat_base_dir: Path) -> None:
    """recipe [reward, grpo]: a reward model trained on the iteration's pairs, then GRPO on the
    prompts users asked, scored by that reward model; lineage is the pairs' feedback."""
    import yaml

    options = ["reward.train.epochs=1", "reward.train.save_every=0", "grpo.train.max_steps=3", "grpo.train.eval_every=0",
               "grpo.train.save_every=0", "grpo.sampling.max_new_tokens=8"]
    cfg = loop_config(tmp_path, chat_base_dir, iterations=1, recipe=["reward", "grpo"], stage_options=options,
                      **{"simulation.users": 8, "simulation.turns_per_user": 6, "evaluate.gate": "win_rate_lower>-1",
                         "evaluate.max_prompts": 32})
    run_loop(cfg)
    folder = Path(cfg.run.output_dir) / cfg.run.name
    (state,) = states(folder)
    assert state["steps"]["train"]["stages"] == ["reward", "grpo"]
    grpo = yaml.safe_load((folder / "iter-1" / "train-grpo" / "config.yaml").read_text())
    assert grpo["rl"]["reward"] == str(folder / "iter-1" / "train-reward" / "final")
    assert grpo["model"]["name_or_path"] == str(chat_base_dir)
    pairs = [json.loads(line) for line in (folder / "iter-1" / "datasets" / "pairs.jsonl").read_text().splitlines()]
    with FeedbackStore(cfg.db) as store:
        lineage = {row["feedback_id"] for row in store.lineage(state["steps"]["register"]["version"])}
    assert lineage == {fid for p in pairs for fid in p["feedback_ids"]}
