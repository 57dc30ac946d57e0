"""Online RL on a task with a known optimum: a tiny Llama over a 200-word vocabulary (conftest's
``word_model_dir``), rewarded for the share of "good" words (the first 10% of the vocabulary) in its completions — the shared
benchmark's task in miniature. At the start about 10% of sampled words are good.

Each of PPO, GRPO, RLOO and REINFORCE++ must raise the held-out reward well above the start with
the KL to the reference bounded; a larger β ends closer to the reference; the supervised term
keeps the SFT loss lower; a held-out judge that is not the training reward agrees; a run killed
with -9 and resumed reproduces the uninterrupted run's metrics step for step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignloop.cli import main
from alignloop.runs import read_metrics
from conftest import WORDS


def rl_args(algo: str, task: dict, out: Path, *extra: str) -> list[str]:
    return [algo, f"--model.name_or_path={task['policy']}", f"--data.path={task['train']}",
            f"--rl.reward={task['rewards']}:good_share", f"--rl.eval_prompts={task['heldout']}",
            f"--run.output_dir={out}", "--sampling.max_new_tokens=12", "--train.lr=1e-2", "--train.max_steps=30",
            "--train.eval_every=30", "--train.save_every=0", "--train.seed=0", *extra]


GROUPED = ("--train.batch_size=4", "--rl.group_size=4")
SINGLE = ("--train.batch_size=16",)


@pytest.mark.parametrize("algo, extra", [
    ("grpo", (*GROUPED, "--rl.kl_coef=0.05")),
    ("rloo", (*GROUPED, "--rl.kl_coef=0.05")),
    ("reinforce", (*SINGLE, "--rl.kl_coef=0.05")),
    ("ppo", (*SINGLE, "--rl.kl_coef=0.05", "--train.lr=3e-3")),  # 2 epochs × 2 minibatches: 4 updates a step
])
def test_each_algorithm_raises_held_out_reward_with_bounded_kl(algo: str, extra: tuple, task: dict, tmp_path: Path) -> None:
    assert main(rl_args(algo, task, tmp_path, *extra)) == 0
    metrics = read_metrics(tmp_path / algo / "metrics.jsonl")
    last = metrics[-1]
    assert last["step"] == 30
    assert last["eval/start_reward"] < 0.2  # about the 10% of good words a random policy hits
    assert last["eval/reward"] > last["eval/start_reward"] + 0.2, (last["eval/start_reward"], last["eval/reward"])
    assert last["eval/win_rate_lower"] > 0.5
    # Nats per token. A policy collapsed onto one word would be near log 200 = 5.3; these runs
    # (lr 1e-2, near-perfect reward) peak between 0.6 and 3.2 depending on the sampled stream.
    assert all(m["train/kl"] < 4.0 for m in metrics)
    assert last["train/kl"] > 0
    if algo == "ppo":
        assert "train/value_loss" in last and "train/explained_variance" in last
        assert (tmp_path / algo / "final" / "value_head.pt").is_file()
    if algo in ("grpo", "rloo"):
        assert 0.0 <= last["train/zero_std_groups"] <= 1.0
    assert (tmp_path / algo / "report.md").is_file()


@pytest.mark.parametrize("options, expected", [
    (("--train.lr=1e-4",), 1e-3),  # default: 10 × the policy's lr
    (("--train.lr=1e-4", "--rl.value_lr=3e-3"), 3e-3),
])
def test_the_value_head_learns_at_its_own_rate(options: tuple, expected: float, task: dict, tmp_path: Path) -> None:
    """Adam's first update moves every weight with a gradient by exactly its lr (m̂/√v̂ = ±1), so
    one PPO update from the zero-initialised head shows the rate the head was given."""
    assert main(rl_args("ppo", task, tmp_path, *SINGLE, *options, "--train.max_steps=1", "--rl.epochs=1",
                        "--rl.minibatches=1", "--train.eval_every=0", "--rl.eval_prompts=null")) == 0
    head = torch.load(tmp_path / "ppo" / "final" / "value_head.pt")
    moved = head["weight"].abs().flatten()
    assert torch.allclose(moved.median(), torch.tensor(expected), rtol=0.01), moved.median()


def test_a_larger_kl_coefficient_ends_closer_to_the_reference(task: dict, tmp_path: Path) -> None:
    for beta in ("0.01", "1.0"):
        assert main(rl_args("rloo", task, tmp_path, *GROUPED, f"--rl.kl_coef={beta}", f"--run.name=b{beta}",
                            "--train.max_steps=20", "--train.eval_every=0")) == 0
    final_kl = {beta: sum(m["train/kl"] for m in read_metrics(tmp_path / f"b{beta}" / "metrics.jsonl")[-5:]) / 5
                for beta in ("0.01", "1.0")}
    assert final_kl["1.0"] < 0.5 * final_kl["0.01"], final_kl


def test_the_supervised_term_keeps_the_sft_loss_lower(task: dict, tmp_path: Path) -> None:
    from alignloop.config import DataConfig
    from alignloop.data.load import load_records
    from alignloop.models.load import load_causal_lm, load_tokenizer
    from alignloop.config import ModelConfig
    from alignloop.rollout.scoring import heldout_loss
    from alignloop.train.sft import sft_examples

    for name, alpha in (("rl-only", "0"), ("with-ptx", "1.0")):
        assert main(rl_args("grpo", task, tmp_path, *GROUPED, f"--rl.ptx_coef={alpha}", f"--rl.ptx_data={task['sft']}",
                            f"--run.name={name}", "--train.max_steps=20", "--train.eval_every=0")) == 0
    losses = {}
    for name in ("rl-only", "with-ptx"):
        cfg = ModelConfig(name_or_path=str(tmp_path / name / "final"))
        tokenizer = load_tokenizer(cfg)
        model = load_causal_lm(cfg, tokenizer, 0)
        examples = sft_examples(str(task["sft"]), load_records(str(task["sft"]), ("prompt_completion",)), DataConfig(),
                                tokenizer, 64)
        losses[name] = heldout_loss(model, examples, 8, tokenizer.pad_token_id, None)["eval/loss"]
    metrics = read_metrics(tmp_path / "with-ptx" / "metrics.jsonl")
    assert "train/ptx_loss" in metrics[-1]
    assert losses["with-ptx"] < losses["rl-only"] - 0.3, losses


def test_a_held_out_judge_that_is_not_the_reward_prefers_the_trained_policy(task: dict, tmp_path: Path) -> None:
    assert main(rl_args("grpo", task, tmp_path, *GROUPED, "--train.eval_every=0")) == 0
    code = main(["evaluate", f"--candidate={tmp_path / 'grpo' / 'final'}", f"--baseline={task['policy']}",
                 f"--prompts={task['heldout']}", "--judge.kind=function", f"--judge.function={task['rewards']}:judge",
                 "--sampling.max_new_tokens=12", f"--run.output_dir={tmp_path}", "--run.name=judged",
                 "--gate=win_rate_lower>0.5"])
    assert code == 0, json.loads((tmp_path / "judged" / "metrics.json").read_text())


def test_kill_9_then_resume_reproduces_the_run_step_for_step(task: dict, tmp_path: Path, straight_and_killed_runs) -> None:
    """PPO with an adaptive KL: policy, value head, optimiser, KL controller and sampling all resume."""
    common = rl_args("ppo", task, tmp_path, *SINGLE, "--rl.kl_coef=0.05", "--rl.kl_target=0.01", "--rl.kl_horizon=20",
                     "--train.max_steps=10", "--train.save_every=2", "--train.eval_every=5", "--train.threads=1")
    straight, again = straight_and_killed_runs(common, tmp_path, 4)
    assert [m["step"] for m in again] == list(range(1, 11))
    keys = ("train/reward", "train/policy_loss", "train/value_loss", "train/kl", "train/kl_coef", "eval/reward")
    for a, b in zip(straight, again):
        assert [a.get(k) for k in keys] == [b.get(k) for k in keys], a["step"]
    assert straight[-1]["train/kl_coef"] != 0.05  # the controller did move β, so its state mattered


def test_bad_rewards_and_overlong_prompts_are_named(task: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def nan_at_3(prompts, completions, **f):\n    return [float('nan') if i == 3 else 0.0 for i in range(len(completions))]\n"
                   "def short(prompts, completions, **f):\n    return [0.0]\n")
    assert main(rl_args("grpo", task, tmp_path, *GROUPED, f"--rl.reward={bad}:nan_at_3", "--train.max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "nan_at_3" in err and "3" in err
    assert main(rl_args("grpo", task, tmp_path, *GROUPED, f"--rl.reward={bad}:short", "--train.max_steps=1")) == 2
    assert "short" in capsys.readouterr().err
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": " ".join(WORDS[:50])}) + "\n")
    assert main(rl_args("grpo", task, tmp_path, *GROUPED, f"--data.path={long_prompts}", "--data.max_length=20",
                        "--train.max_steps=1")) == 2
    assert "long.jsonl:1: prompt of 50 tokens, longer than the 20 allowed" in capsys.readouterr().err


def test_a_kl_past_its_limit_stops_with_a_checkpoint(task: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(rl_args("grpo", task, tmp_path, *GROUPED, "--rl.kl_coef=0.001", "--rl.kl_stop=1e-6", "--train.lr=3e-2",
                        "--train.max_steps=20", "--train.eval_every=0")) == 2
    err = capsys.readouterr().err
    assert "past rl.kl_stop" in err and "checkpoint saved" in err
    assert list((tmp_path / "grpo" / "checkpoints").glob("step-*"))


def test_lora_uses_the_base_with_the_adapter_off_as_reference(task: dict, tmp_path: Path) -> None:
    assert main(rl_args("grpo", task, tmp_path, *GROUPED, "--rl.kl_coef=0.05", "--model.lora.r=4", "--train.lr=1e-2",
                        "--train.max_steps=8", "--train.eval_every=0")) == 0
    metrics = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    assert metrics[0]["train/kl"] == pytest.approx(0.0, abs=1e-4)  # step 1: the adapter is still zero
    assert metrics[-1]["train/kl"] > 1e-4  # then the policy leaves the base, and the KL sees it


def test_a_reference_with_another_tokenizer_is_refused(task: dict, tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(rl_args("rloo", task, tmp_path, *GROUPED, "--rl.kl_coef=0.05", f"--rl.ref_model={tiny_model_dir}",
                        "--train.max_steps=1")) == 2
    assert "has another tokenizer than the policy" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (("--rl.group_size=1",), "rl.group_size must be ≥ 2 for grpo"),
    (("--rl.algo=ppo2",), "rl.algo: 'ppo2' is not one of ppo, grpo, rloo, reinforce"),
])
def test_an_algorithm_its_settings_cannot_run_is_refused_before_loading(options: tuple, message: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing"  # never opened: the check comes first
    assert main(["grpo", f"--model.name_or_path={missing}", f"--data.path={missing}.jsonl", f"--rl.reward={missing}.py:f",
                 f"--run.output_dir={tmp_path}", *options]) == 2
    assert message in capsys.readouterr().err


def test_a_minibatch_of_an_experience_is_an_experience_of_those_rows() -> None:
    from alignloop.rollout.scoring import Batch
    from alignloop.train.rl import Experience

    batch = Batch.build([[5], [6, 7], [8]], [[1, 2], [3], [4, 4]], 0, torch.device("cpu"))
    experience = Experience(batch, torch.arange(6.0).view(3, 2), None, 0.05, torch.tensor([1.0, 2.0, 3.0]), None, None)
    minibatch = experience.rows(torch.tensor([2, 0]))
    assert isinstance(minibatch, Experience) and minibatch.kl_coef == 0.05
    assert minibatch.ref_logprobs is None and minibatch.old_values is None and minibatch.returns is None
    assert minibatch.advantages.tolist() == [3.0, 1.0] and minibatch.old_logprobs.tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert minibatch.batch.targets.tolist() == [[4, 4], [1, 2]] and minibatch.mask.tolist() == [[1.0, 1.0], [1.0, 1.0]]
