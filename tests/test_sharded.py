"""Sharded training (``train.strategy=fsdp``, torch FSDP2) and several nodes, on gloo: two
processes compute what one process computes at the same global batch, each holding half the
weights; a kill -9 under sharding resumes to the uninterrupted run; two "nodes" of one process
each (two torchrun launches on 127.0.0.1) match one process.

Why a tolerance and not bitwise: the gradients are summed in another order (a reduce-scatter over
two halves against one backward over the whole batch), so the last bits of each sum differ. The
tolerances below are about 100× float32's rounding of these sums. RL samples, and a rounding
difference can flip a sampled token once the weights have moved, after which the two runs
legitimately see different data: its test compares the steps before that can happen.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignloop.runs import read_metrics
from conftest import alignloop_command, write_word_task
from test_rl import rl_args
from test_train import reverse_rows

# Each process multiplies with torch's GEMM: no per-process timing picks another kernel (and rounding).
COMMON = ["--train.warmup_steps=0", "--train.save_every=0", "--train.eval_every=0", "--train.threads=1",
          "--model.cpu_linear=torch", "--train.lr=1e-3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "alignloop", *args]


def launch(command: list[str]) -> str:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def one_and_sharded(stage: str, out: Path, batch: int, *args: str, strategy: str = "fsdp") -> tuple[list[dict], list[dict], str]:
    """``stage`` in one process at ``train.batch_size=batch`` and in two processes sharded by
    ``strategy`` (the run's name) at half of it each: both runs' metrics, and the sharded run's log."""
    base = [stage, f"--run.output_dir={out}", *COMMON, *args]
    launch(alignloop_command(*base, "--run.name=one", f"--train.batch_size={batch}"))
    log = launch(torchrun(*base, f"--run.name={strategy}", f"--train.batch_size={batch // 2}", f"--train.strategy={strategy}"))
    return read_metrics(out / "one" / "metrics.jsonl"), read_metrics(out / strategy / "metrics.jsonl"), log


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture
def reverse_task(tmp_path: Path) -> dict[str, Path]:
    """SFT rows (reverse five colour words) and preference pairs built from them."""
    rows = reverse_rows(64, seed=1)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"] + " red"} for r in rows]
    return write_word_task(tmp_path / "data", {"sft": rows, "pairs": pairs})


def test_fsdp_sft_matches_one_process_and_each_process_holds_half_the_weights(tiny_model_dir, reverse_task, tmp_path):
    one, sharded, log = one_and_sharded("sft", tmp_path, 8, f"--model.name_or_path={tiny_model_dir}",
                                        f"--data.path={reverse_task['sft']}", "--data.eval_fraction=0",
                                        "--train.max_steps=3")
    total = sum(t.numel() for t in load_file(tiny_model_dir / "model.safetensors").values())
    assert f"FSDP: each of 2 processes holds {total // 2:,} of the {total:,} parameters" in log
    assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=1e-5)
    assert [m["train/grad_norm"] for m in sharded] == pytest.approx([m["train/grad_norm"] for m in one], rel=1e-4)
    assert sharded[-1]["train/loss"] < sharded[0]["train/loss"]
    assert_same_weights(tmp_path / "one", tmp_path / "fsdp", atol=1e-5)


def test_fsdp_dpo_matches_one_process(tiny_model_dir, reverse_task, tmp_path):
    one, sharded, _ = one_and_sharded("dpo", tmp_path, 8, f"--model.name_or_path={tiny_model_dir}",
                                      f"--data.path={reverse_task['pairs']}", "--data.eval_fraction=0",
                                      "--train.max_steps=3")
    # The logged loss is the whole batch's, averaged over the processes, as in one process.
    assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=1e-4)
    assert [m["train/rewards/margin"] for m in sharded][1:] == pytest.approx([m["train/rewards/margin"] for m in one][1:], rel=1e-3)
    assert sharded[-1]["train/loss"] < sharded[0]["train/loss"]
    assert_same_weights(tmp_path / "one", tmp_path / "fsdp", atol=1e-4)


def test_fsdp_grpo_matches_one_process_and_raises_held_out_reward(task, tmp_path):
    """GRPO samples from a whole copy of the policy gathered from the shards after every update
    (TrainingSession.generation_model): its first step draws one process's samples and makes its
    update; over 30 steps the held-out reward rises as in one process (tests/test_rl.py)."""
    base = rl_args("grpo", task, tmp_path, "--rl.group_size=4", "--rl.kl_coef=0.05", "--train.threads=1",
                   "--model.cpu_linear=torch")
    launch(alignloop_command(*base, "--run.name=one", "--train.batch_size=4"))
    launch(torchrun(*base, "--run.name=fsdp", "--train.batch_size=2", "--train.strategy=fsdp"))
    one, sharded = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "fsdp"))
    for key in ("train/reward", "train/tokens", "train/grad_norm"):
        assert sharded[0][key] == pytest.approx(one[0][key], rel=1e-4), key
    last = sharded[-1]
    assert last["step"] == 30 and last["eval/reward"] > last["eval/start_reward"] + 0.2, last
    assert last["eval/reward"] == pytest.approx(one[-1]["eval/reward"], abs=0.15)


def test_kill_9_under_fsdp_resumes_to_the_uninterrupted_run(tiny_model_dir, reverse_task, tmp_path, straight_and_killed_runs):
    """Each process saves its shards of the weights and AdamW state (torch distributed checkpoint);
    the resumed run reads them back and continues bit for bit."""
    args = ["sft", f"--model.name_or_path={tiny_model_dir}", f"--data.path={reverse_task['sft']}", f"--run.output_dir={tmp_path}",
            "--data.eval_fraction=0.1", "--train.max_steps=60", "--train.save_every=5", "--train.eval_every=10",
            "--train.batch_size=4", "--train.strategy=fsdp", *COMMON[:1], *COMMON[3:]]
    straight, again = straight_and_killed_runs(args, tmp_path, 10, command=lambda *a: torchrun(*a))
    assert [m["step"] for m in again] == list(range(1, 61))
    assert [(m["train/loss"], m.get("eval/loss")) for m in again] == [(m["train/loss"], m.get("eval/loss")) for m in straight]
    assert (tmp_path / "killed" / "checkpoints" / "step-55" / "shards" / ".metadata").is_file()
    assert_same_weights(tmp_path / "straight", tmp_path / "killed", atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--train.precision=bf16"], ["--model.lora.r=4", "--model.lora.target_modules=[q_proj,v_proj]"],
                                     ["--model.gradient_checkpointing=true"]], ids=["bf16", "lora", "checkpointing"])
def test_fsdp_with_bf16_lora_and_gradient_checkpointing_matches_one_process(options, tiny_model_dir, reverse_task, tmp_path):
    one, sharded, _ = one_and_sharded("sft", tmp_path, 8, f"--model.name_or_path={tiny_model_dir}",
                                      f"--data.path={reverse_task['sft']}", "--data.eval_fraction=0", "--train.max_steps=3", *options)
    # bf16: both runs round to bf16, at other places (FSDP casts the gathered weights, one process its own).
    rel = 1e-3 if "--train.precision=bf16" in options else 1e-5
    assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=rel)
    assert_same_weights(tmp_path / "one", tmp_path / "fsdp", atol=5e-3 if rel > 1e-5 else 1e-5)
    if "--model.lora.r=4" in options:
        assert (tmp_path / "fsdp" / "final" / "adapter" / "adapter_config.json").is_file()


def stage_rows(stage: str) -> list[dict]:
    """The reverse-words task as each of the other stages reads it: KTO thumbs, reward pairs,
    classify labels, PPO prompts."""
    rows = reverse_rows(64, seed=1)
    return {
        "kto": [{"prompt": r["prompt"], "completion": r["completion"] + ("" if i % 2 else " red"), "label": bool(i % 2)}
                for i, r in enumerate(rows)],
        "reward": [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"] + " red"} for r in rows],
        "classify": [{"text": r["prompt"], "label": "red" if "red" in r["prompt"] else "other"} for r in rows],
        "ppo": [{"prompt": r["prompt"]} for r in rows],
    }[stage]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kto", "reward", "classify", "ppo"])
def test_fsdp_runs_every_other_stage(stage, tiny_model_dir, reverse_task, tmp_path):
    """The rest of the stages under FSDP: KTO, reward models and classifiers give one process's
    losses; PPO trains (its advantages are whitened over each process's batch, as in TRL, so its
    numbers differ from one process's by design)."""
    data = stage_rows(stage)
    path = write_word_task(tmp_path / "data", {stage: data})[stage]
    extra = [f"--rl.reward={path.parent / 'rewards.py'}:good_share", "--sampling.max_new_tokens=8"] if stage == "ppo" else []
    one, sharded, _ = one_and_sharded(stage, tmp_path, 8, f"--model.name_or_path={tiny_model_dir}", f"--data.path={path}",
                                      "--train.max_steps=3", *(["--data.eval_fraction=0"] if stage != "ppo" else []), *extra)
    assert (tmp_path / "fsdp" / "final" / "config.json").is_file()
    if stage != "ppo":
        assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_of_one_process_each_match_one_process(strategy, tiny_model_dir, reverse_task, tmp_path):
    """The multi-node recipe of the README: two torchrun launches, --nnodes=2 --node_rank=0/1,
    meeting at a rendezvous address (here 127.0.0.1), one process each."""
    base = ["sft", f"--model.name_or_path={tiny_model_dir}", f"--data.path={reverse_task['sft']}", f"--run.output_dir={tmp_path}",
            "--data.eval_fraction=0", "--train.max_steps=3", *COMMON]
    launch(alignloop_command(*base, "--run.name=one", "--train.batch_size=8"))
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "alignloop",
                               *base, "--run.name=nodes", "--train.batch_size=4", f"--train.strategy={strategy}"],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    nodes_metrics = read_metrics(tmp_path / "nodes" / "metrics.jsonl")
    assert [m["train/loss"] for m in nodes_metrics] == pytest.approx([m["train/loss"] for m in one], rel=1e-5)
    assert_same_weights(tmp_path / "one", tmp_path / "nodes", atol=1e-5)
    assert json.loads((tmp_path / "nodes" / "final" / "trainer_state.json").read_text())["step"] == 3


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2/3 (train.strategy=zero2|zero3): the same loops, run by DeepSpeed's engine
# ---------------------------------------------------------------------------------------------
deepspeed_installed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                         reason="DeepSpeed is not installed (pip install 'alignloop[deepspeed]')")


@deepspeed_installed
@pytest.mark.parametrize("strategy", [pytest.param("zero2", marks=pytest.mark.slow), "zero3"])
def test_zero_sft_with_gradient_accumulation_matches_one_process(strategy, tiny_model_dir, reverse_task, tmp_path):
    """Two micro-batches a step: each process's backward adds its gradients into DeepSpeed's
    reduced shards, and one engine step ends the step (managed_gradient_accumulation: false), as
    one process accumulates two micro-batches and steps once."""
    one, sharded, log = one_and_sharded("sft", tmp_path, 8, f"--model.name_or_path={tiny_model_dir}",
                                        f"--data.path={reverse_task['sft']}", "--data.eval_fraction=0",
                                        "--train.max_steps=3", "--train.grad_accum=2", strategy=strategy)
    assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=1e-5)
    # DeepSpeed's own norm of its gradient shards (what it clips by) reads up to 1e-4 above one
    # process's on this model, though the gradients it applies equal one process's to 1e-8.
    assert [m["train/grad_norm"] for m in sharded] == pytest.approx([m["train/grad_norm"] for m in one], rel=3e-4)
    assert [m["train/lr"] for m in sharded] == [m["train/lr"] for m in one]
    assert sharded[-1]["train/loss"] < sharded[0]["train/loss"]
    assert_same_weights(tmp_path / "one", tmp_path / strategy, atol=1e-5)
    if strategy == "zero3":
        held, total = (int(n.replace(",", "")) for n in
                       re.search(r"ZeRO-3: each of 2 processes holds ([\d,]+) of the ([\d,]+) parameters", log).groups())
        assert held < 0.6 * total  # half of each weight; those under 10 × hidden_size numbers (norms) stay whole


@deepspeed_installed
@pytest.mark.parametrize("strategy", ["zero2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_zero_dpo_matches_one_process(strategy, tiny_model_dir, reverse_task, tmp_path):
    one, sharded, _ = one_and_sharded("dpo", tmp_path, 8, f"--model.name_or_path={tiny_model_dir}",
                                      f"--data.path={reverse_task['pairs']}", "--data.eval_fraction=0",
                                      "--train.max_steps=3", strategy=strategy)
    assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=1e-4)
    assert [m["train/rewards/margin"] for m in sharded][1:] == pytest.approx([m["train/rewards/margin"] for m in one][1:], rel=1e-3)
    assert sharded[-1]["train/loss"] < sharded[0]["train/loss"]
    assert_same_weights(tmp_path / "one", tmp_path / strategy, atol=1e-4)


@deepspeed_installed
@pytest.mark.parametrize("strategy", [pytest.param("zero2", marks=pytest.mark.slow), "zero3"])
def test_zero_grpo_matches_one_process_and_raises_held_out_reward(strategy, task, tmp_path):
    """Under ZeRO-3 GRPO samples from a whole copy gathered from the shards after every update
    (TrainingSession.generation_model), under ZeRO-2 from the module itself (its weights are whole)."""
    base = rl_args("grpo", task, tmp_path, "--rl.group_size=4", "--rl.kl_coef=0.05", "--train.threads=1",
                   "--model.cpu_linear=torch")
    launch(alignloop_command(*base, "--run.name=one", "--train.batch_size=4"))
    launch(torchrun(*base, f"--run.name={strategy}", "--train.batch_size=2", f"--train.strategy={strategy}"))
    one, sharded = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", strategy))
    for key in ("train/reward", "train/tokens"):
        assert sharded[0][key] == pytest.approx(one[0][key], rel=1e-4), key
    assert sharded[0]["train/grad_norm"] == pytest.approx(one[0]["train/grad_norm"], rel=3e-4)  # as in the SFT test
    last = sharded[-1]
    assert last["step"] == 30 and last["eval/reward"] > last["eval/start_reward"] + 0.2, last
    assert last["eval/reward"] == pytest.approx(one[-1]["eval/reward"], abs=0.15)


@deepspeed_installed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_kill_9_under_zero_resumes_to_the_uninterrupted_run(strategy, tiny_model_dir, reverse_task, tmp_path, straight_and_killed_runs):
    """Each process saves its shards of the optimiser's fp32 masters and moments (and under ZeRO-3
    of the weights: DeepSpeed's checkpoint, in step-N/deepspeed-zero2|3/) beside accelerate's
    schedule and RNG states; the resumed run reads them back and continues bit for bit."""
    args = ["sft", f"--model.name_or_path={tiny_model_dir}", f"--data.path={reverse_task['sft']}", f"--run.output_dir={tmp_path}",
            "--data.eval_fraction=0.1", "--train.max_steps=30", "--train.save_every=5", "--train.eval_every=10",
            "--train.batch_size=4", f"--train.strategy={strategy}", *COMMON[:1], *COMMON[3:]]
    straight, again = straight_and_killed_runs(args, tmp_path, 10, command=lambda *a: torchrun(*a))
    assert [m["step"] for m in again] == list(range(1, 31))
    assert [(m["train/loss"], m.get("eval/loss")) for m in again] == [(m["train/loss"], m.get("eval/loss")) for m in straight]
    assert list((tmp_path / "killed" / "checkpoints" / "step-25" / f"deepspeed-{strategy}").glob("*optim_states.pt"))
    assert_same_weights(tmp_path / "straight", tmp_path / "killed", atol=0)


@deepspeed_installed
@pytest.mark.slow
@pytest.mark.parametrize("options", [["--train.precision=bf16"], ["--model.lora.r=4", "--model.lora.target_modules=[q_proj,v_proj]"],
                                     ["--model.gradient_checkpointing=true"]], ids=["bf16", "lora", "checkpointing"])
def test_zero3_with_bf16_lora_and_gradient_checkpointing_matches_one_process(options, tiny_model_dir, reverse_task, tmp_path):
    one, sharded, _ = one_and_sharded("sft", tmp_path, 8, f"--model.name_or_path={tiny_model_dir}", f"--data.path={reverse_task['sft']}",
                                      "--data.eval_fraction=0", "--train.max_steps=3", *options, strategy="zero3")
    # bf16: both runs round to bf16, at other places (DeepSpeed reduces fp32 gradients of bf16 shards).
    rel = 1e-3 if "--train.precision=bf16" in options else 1e-5
    assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=rel)
    assert_same_weights(tmp_path / "one", tmp_path / "zero3", atol=5e-3 if rel > 1e-5 else 1e-5)
    if "--model.lora.r=4" in options:
        assert (tmp_path / "zero3" / "final" / "adapter" / "adapter_config.json").is_file()


@deepspeed_installed
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["kto", "reward", "classify"])
def test_zero3_runs_every_other_stage(stage, tiny_model_dir, tmp_path):
    """KTO, reward models and classifiers under ZeRO-3 give one process's losses (PPO: refused, below)."""
    data = stage_rows(stage)
    path = write_word_task(tmp_path / "data", {stage: data})[stage]
    one, sharded, _ = one_and_sharded(stage, tmp_path, 8, f"--model.name_or_path={tiny_model_dir}", f"--data.path={path}",
                                      "--train.max_steps=3", "--data.eval_fraction=0", strategy="zero3")
    assert (tmp_path / "zero3" / "final" / "config.json").is_file()
    assert [m["train/loss"] for m in sharded] == pytest.approx([m["train/loss"] for m in one], rel=1e-4)


@deepspeed_installed
def test_zero_refuses_a_module_trained_beside_the_model(tiny_model_dir, reverse_task, tmp_path):
    """PPO's value head lives outside the model DeepSpeed's engine trains: refused, naming the fix."""
    path = write_word_task(tmp_path / "data", {"ppo": [{"prompt": r["prompt"]} for r in reverse_rows(8, seed=1)]})["ppo"]
    done = subprocess.run(torchrun("ppo", f"--model.name_or_path={tiny_model_dir}", f"--data.path={path}", f"--run.output_dir={tmp_path}",
                                   f"--rl.reward={path.parent / 'rewards.py'}:good_share", "--train.strategy=zero2", *COMMON),
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "train.strategy=zero2 trains the model alone" in done.stderr and "use train.strategy=fsdp or ddp" in done.stderr


def test_zero_without_deepspeed_installed_names_the_option(monkeypatch):
    from alignloop.errors import ConfigError
    from alignloop.train import zero

    monkeypatch.setattr(zero.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.strategy=zero3 .*pip install 'alignloop\[deepspeed\]'"):
        zero.import_deepspeed("zero3")
