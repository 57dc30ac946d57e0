"""Training behaviour on tiny models: losses fall, exact resume after kill -9, Ctrl-C, LoRA,
gradient accumulation and process-count invariance, the saved model loads with plain transformers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignloop.cli import main
from alignloop.config import ModelConfig
from alignloop.data.batching import collate
from alignloop.data.tokenize import tokenize_prompt_completion
from alignloop.losses import completion_nll, count_loss_tokens
from alignloop.runs import read_metrics
from conftest import alignloop_command, wait_for

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
WORDS = "red green blue black white pink gray brown".split()


def reverse_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable rule: the completion is the prompt's words reversed."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (5,), generator=g)]
        rows.append({"prompt": "reverse: " + " ".join(words) + " =>", "completion": " " + " ".join(reversed(words))})
    return rows


@pytest.fixture
def sft_data(tmp_path: Path) -> tuple[Path, Path]:
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in reverse_rows(64, seed=1)))
    held.write_text("".join(json.dumps(r) + "\n" for r in reverse_rows(16, seed=2)))
    return train, held


def held_out_loss(model_dir: Path | str, rows: list[dict]) -> float:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    batch = collate([tokenize_prompt_completion(tok, r["prompt"], r["completion"]) for r in rows], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, _ = completion_nll(logits, batch["labels"], count_loss_tokens(batch["labels"]))
    return float(loss)


def sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", f"--model.name_or_path={model}", f"--data.path={data}", f"--run.output_dir={out}",
            "--data.eval_fraction=0.1", "--train.warmup_steps=0", *extra]


def test_sft_loss_falls_and_final_loads_with_plain_transformers(tiny_model_dir, sft_data, tmp_path):
    train, held = sft_data
    held_rows = [json.loads(line) for line in held.read_text().splitlines()]
    before = held_out_loss(tiny_model_dir, held_rows)
    assert main(sft_args(tiny_model_dir, train, tmp_path / "runs", "--train.max_steps=60", "--train.lr=3e-3",
                         "--train.eval_every=20", "--train.save_every=0")) == 0
    run = tmp_path / "runs" / "sft"
    after = held_out_loss(run / "final", held_rows)
    assert after < before - 1.0, (before, after)

    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 61))
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (run / "report.md").is_file() and (run / "loss.png").stat().st_size > 10_000

    tok = AutoTokenizer.from_pretrained(str(run / "final"))
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    ids = tok("reverse: red blue =>", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare")
def test_pretraining_on_real_text_lowers_held_out_loss(tmp_path):
    assert main(["pretrain", "--model.name_or_path=tiny-1m", f"--data.path={SHAKESPEARE}", "--data.max_length=64",
                 f"--run.output_dir={tmp_path}", "--train.max_steps=40", "--train.lr=3e-3", "--train.eval_every=5",
                 "--train.eval_batches=4", "--train.save_every=0"]) == 0
    evals = [m["eval/loss"] for m in read_metrics(tmp_path / "pretrain" / "metrics.jsonl") if "eval/loss" in m]
    assert evals[-1] < evals[0] - 1.0, evals


def test_kill_9_then_resume_reproduces_uninterrupted_losses(tiny_model_dir, sft_data, tmp_path, straight_and_killed_runs):
    train, _ = sft_data
    common = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=40", "--train.save_every=5",
                      "--train.eval_every=10", "--train.batch_size=16", "--train.threads=1")
    straight, again = straight_and_killed_runs(common, tmp_path, 10)
    assert [m["step"] for m in again] == list(range(1, 41))
    for a, b in zip(straight, again):
        assert (a["step"], a["train/loss"], a.get("eval/loss")) == (b["step"], b["train/loss"], b.get("eval/loss"))
    w1 = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, sft_data, tmp_path):
    train, _ = sft_data
    args = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=100000", "--train.save_every=0")
    proc = subprocess.Popen(alignloop_command(*args), stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sft" / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    checkpoints = list((tmp_path / "sft" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.removeprefix("step-"))
    assert step >= 2 and f"stopped at step {step}" in stderr


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, sft_data, tmp_path):
    train, _ = sft_data
    base = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=2", "--train.save_every=0",
                    "--train.eval_every=0", "--data.eval_fraction=0", "--train.lr=1e-3")
    assert main([*base, "--run.name=big", "--train.batch_size=8", "--train.grad_accum=1"]) == 0
    assert main([*base, "--run.name=accum", "--train.batch_size=1", "--train.grad_accum=8"]) == 0
    big = load_file(tmp_path / "big" / "final" / "model.safetensors")
    accum = load_file(tmp_path / "accum" / "final" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(start[k], big[k]) for k in big)
    for k in big:
        torch.testing.assert_close(big[k], accum[k], rtol=1e-4, atol=1e-5)
    losses = [[m["train/loss"] for m in read_metrics(tmp_path / n / "metrics.jsonl")] for n in ("big", "accum")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_two_processes_match_one(tiny_model_dir, sft_data, tmp_path):
    """DDP over gloo with 4 sequences per process equals 1 process with 8."""
    train, _ = sft_data
    base = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=2", "--train.save_every=0",
                    "--train.eval_every=0", "--data.eval_fraction=0", "--train.lr=1e-3", "--train.threads=1")
    assert main([*base, "--run.name=one", "--train.batch_size=8"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "alignloop"]
    done = subprocess.run([*torchrun, *base, "--run.name=two", "--train.batch_size=4", "--train.save_every=1"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file(), done.stderr[-3000:]
    assert done.stderr.count(" done: model in ") == 1, done.stderr[-3000:]  # rank 0 only, not once per process
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert len(state["cpu_kernels"]) == 2 and all("training" in choices for choices in state["cpu_kernels"])
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def test_lora_trains_adapters_and_saves_a_merged_model(tiny_model_dir, sft_data, tmp_path):
    train, _ = sft_data
    assert main([*sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=5", "--train.lr=1e-2",
                           "--train.save_every=0", "--train.eval_every=0"),
                 "--model.lora.r=4", "--model.lora.target_modules=[q_proj,v_proj]"]) == 0
    final = tmp_path / "sft" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = load_file(final / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert not any("lora" in k for k in merged)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed), changed
    AutoModelForCausalLM.from_pretrained(str(final))  # plain transformers, no peft


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_bf16_keeps_small_updates_that_bf16_weights_alone_would_round_away(precision, tiny_model_dir, sft_data, tmp_path):
    """At lr 1e-5 an Adam update (~1e-5 per weight) is far below bf16's resolution (~1/256 of a
    weight): only fp32 master weights (or fp32 weights under autocast) keep it. The bf16 run's
    weight change must point the same way as the fp32 run's and have a similar size."""
    train, _ = sft_data
    base = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=4", "--train.lr=1e-5", "--train.save_every=0",
                    "--train.eval_every=0", "--data.eval_fraction=0")
    assert main([*base, "--run.name=fp32"]) == 0
    assert main([*base, f"--run.name={precision}", f"--train.precision={precision}"]) == 0
    start = load_file(tiny_model_dir / "model.safetensors")
    fp32 = load_file(tmp_path / "fp32" / "final" / "model.safetensors")
    low = load_file(tmp_path / precision / "final" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in low.values())
    d_fp32 = torch.cat([(fp32[k] - start[k]).flatten() for k in start])
    d_low = torch.cat([(low[k] - start[k]).flatten() for k in start])
    cosine = torch.nn.functional.cosine_similarity(d_fp32, d_low, dim=0)
    assert cosine > 0.9, cosine
    assert 0.5 < d_low.norm() / d_fp32.norm() < 2.0


def test_a_frozen_copy_cast_alike_computes_exactly_as_the_bf16_policy(tiny_model_dir):
    """RL's reference is a frozen copy of the starting policy. Cast as the policy is, it runs bf16
    matmuls (fast) and gives the policy's logits bit for bit before the first update; left in fp32
    it would differ by bf16's rounding."""
    import copy

    from alignloop.train.loop import Precision

    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    precision = Precision(policy, "bf16")
    ids = torch.randint(4, policy.config.vocab_size, (2, 12))
    with torch.no_grad():
        fp32_logits = reference(input_ids=ids).logits
        assert precision.cast_frozen(reference) is reference
        assert all(p.dtype == torch.bfloat16 for p in reference.parameters())
        assert all(b.dtype == torch.float32 for b in reference.buffers() if b.is_floating_point())
        policy_logits = policy(input_ids=ids).logits
        assert torch.equal(reference(input_ids=ids).logits, policy_logits)
        assert not torch.equal(fp32_logits.to(policy_logits.dtype), policy_logits)
    fp32_copy = copy.deepcopy(reference).float()
    assert Precision(fp32_copy, "fp32").cast_frozen(fp32_copy).lm_head.weight.dtype == torch.float32


def test_bf16_resume_from_a_checkpoint_continues_exactly(tiny_model_dir, sft_data, tmp_path):
    """The fp32 master weights are part of the checkpoint: continuing from step 3 in a new run
    folder reproduces the losses of steps 4-6."""
    train, _ = sft_data
    base = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=6", "--train.precision=bf16",
                    "--train.save_every=3", "--train.eval_every=0", "--data.eval_fraction=0")
    assert main([*base, "--run.name=straight"]) == 0
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-3"
    assert main([*base, "--run.name=continued", f"--resume={checkpoint}"]) == 0
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    continued = read_metrics(tmp_path / "continued" / "metrics.jsonl")
    assert [m["step"] for m in continued] == [4, 5, 6]
    assert [m["train/loss"] for m in continued] == [m["train/loss"] for m in straight[3:]]


def test_a_resume_keeps_the_cpu_kernels_the_checkpointed_process_chose(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """Under ``model.cpu_linear: auto`` each process times oneDNN against torch's GEMM. A checkpoint
    records the choice, and a resumed process whose own timing went the other way adopts it: it
    makes no oneDNN product and reproduces the straight run's losses exactly."""
    from alignloop.models import cpu_linear

    train, _ = sft_data
    base = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=6", "--train.save_every=3",
                    "--train.eval_every=0", "--data.eval_fraction=0")
    monkeypatch.setattr(cpu_linear, "_choices", {"training": False})  # this process timed F.linear faster
    assert main([*base, "--run.name=straight"]) == 0
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["cpu_kernels"] == [{"training": False}]

    monkeypatch.setattr(cpu_linear, "_choices", {"training": True})  # the resumed process timed oneDNN faster
    onednn_products = []
    linear = cpu_linear._linear
    monkeypatch.setattr(cpu_linear, "_linear", lambda *args: onednn_products.append(1) or linear(*args))
    assert main([*base, "--run.name=continued", f"--resume={checkpoint}"]) == 0
    assert cpu_linear.chosen_kernels() == {"training": False} and not onednn_products
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    continued = read_metrics(tmp_path / "continued" / "metrics.jsonl")
    assert [m["train/loss"] for m in continued] == [m["train/loss"] for m in straight[3:]]


def test_each_rank_resumes_with_the_kernel_choices_it_made_itself(tmp_path, monkeypatch):
    """Under DDP each rank times the kernels for itself, so two ranks can choose differently; the
    checkpoint keeps the choices by rank and each resumed rank adopts its own (rank 0's when the
    run now has more ranks than were recorded)."""
    from types import SimpleNamespace

    from alignloop.models import cpu_linear
    from alignloop.runs import STATE_FILE
    from alignloop.train.loop import resume

    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3, "cpu_kernels": [{"training": True}, {"training": False}]}))
    for rank, expected in ((0, True), (1, False), (2, True)):
        monkeypatch.setattr(cpu_linear, "_choices", {})
        accelerator = SimpleNamespace(process_index=rank, load_state=lambda folder: None)
        assert resume(accelerator, None, str(tmp_path)) == {"step": 3}
        assert cpu_linear.chosen_kernels() == {"training": expected}


def test_a_completed_run_is_not_trained_again_unless_its_settings_change(tiny_model_dir, sft_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alignloop")
    train, _ = sft_data
    args = sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=2", "--train.save_every=0", "--train.eval_every=0")
    assert main(args) == 0
    final = tmp_path / "sft" / "final" / "model.safetensors"
    first = final.stat().st_mtime_ns
    assert main(args) == 0
    assert final.stat().st_mtime_ns == first and "already complete" in caplog.text
    assert main([*args, "--train.lr=1e-3"]) == 0
    assert final.stat().st_mtime_ns != first
    assert [m["step"] for m in read_metrics(tmp_path / "sft" / "metrics.jsonl")] == [1, 2]


def test_builtin_tiny_model_is_a_real_llama_with_a_chat_template():
    from alignloop.models.load import load_causal_lm, load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path="tiny-5m"))
    model = load_causal_lm(ModelConfig(name_or_path="tiny-5m"), tok, seed=0)
    assert model.config.model_type == "llama"
    assert 4e6 < sum(p.numel() for p in model.parameters()) < 6e6
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_time_budget_ends_training_after_the_step_that_spends_it(tiny_model_dir, sft_data, tmp_path):
    train, _ = sft_data
    assert main(sft_args(tiny_model_dir, train, tmp_path, "--train.max_steps=50", "--train.time_budget_s=0",
                         "--train.eval_every=0", "--run.name=budget")) == 0
    metrics = read_metrics(tmp_path / "budget" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1]
    assert "eval/loss" in metrics[-1]  # the last step is evaluated, as at max_steps
    assert (tmp_path / "budget" / "final" / "model.safetensors").is_file()


def test_epochs_alone_replace_the_default_step_count(tiny_model_dir, sft_data, tmp_path):
    train, _ = sft_data  # 64 records, 6 held out: 58 for training, 7 batches of 8 per epoch
    # sft's default is max_steps=200; epochs given alone replace it (max_steps wins only when both are given)
    assert main(sft_args(tiny_model_dir, train, tmp_path, "--train.epochs=2", "--train.eval_every=0", "--run.name=epochs")) == 0
    steps = [m["step"] for m in read_metrics(tmp_path / "epochs" / "metrics.jsonl")]
    assert steps[-1] == 2 * (57 // 8)
