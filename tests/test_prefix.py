"""Shared-prefix forwards give what plain forwards give: logits, hidden states, rewards and
gradients, for the shapes DPO, RL and reward models use."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from alignloop.data.tokenize import Example
from alignloop.models.prefix import plan_prefixes, shared_prefix_forward

VOCAB = 40


def llama_config(attn: str = "sdpa", **kw) -> LlamaConfig:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, **kw)
    config._attn_implementation = attn
    return config


def random_rows(seed: int = 1) -> tuple[list[list[int]], list[int]]:
    """Two prompts sampled 3 and 2 times (different completion lengths) and one row alone; the
    limits stop each prefix at its prompt's end."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    a, b = draw(20), draw(11)
    rows = [a + draw(k) for k in (5, 9, 3)] + [b + draw(k) for k in (7, 12)] + [draw(6)]
    return rows, [20, 20, 20, 11, 11, 3]


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_plan_groups_rows_of_one_prompt_and_respects_limits():
    rows, limits = random_rows()
    plan = plan_prefixes(rows, limits, pad_id=0, min_saving=0.0)
    groups = plan.group.tolist()
    assert groups[0] == groups[1] == groups[2] and groups[3] == groups[4] and len(set(groups)) == 3
    assert plan.starts.tolist() == limits
    for i, row in enumerate(rows):  # prefix + suffix is the row
        g, start = groups[i], int(plan.starts[i])
        prefix = plan.prefix_ids[g][plan.prefix_mask[g].bool()].tolist()
        suffix = plan.suffix_ids[i][plan.suffix_mask[i].bool()].tolist()
        assert prefix == row[:start] and prefix + suffix == row


def test_plan_declines_when_nothing_is_shared_and_caps_at_a_limit():
    rows = [[1, 2, 3, 4] * 5, [5, 6, 7, 8] * 5]
    assert plan_prefixes(rows, [19, 19], pad_id=0) is None  # no common prefix: a plain forward
    same = [[1] * 30 + [2, 3], [1] * 30 + [4, 5, 6]]
    plan = plan_prefixes(same, [10, 30], pad_id=0, min_saving=0.0)
    assert plan.starts.tolist() == [10, 10]  # the tighter limit binds the whole group
    assert plan_prefixes(same, [0, 30], pad_id=0) is None  # a row that may share nothing


@pytest.mark.parametrize("make", [lambda: LlamaForCausalLM(llama_config("sdpa")),
                                  lambda: LlamaForCausalLM(llama_config("eager")),
                                  lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))],
                         ids=["llama-sdpa", "llama-eager", "gpt2"])
def test_causal_lm_logits_hidden_and_gradients_match_a_plain_forward(make):
    torch.manual_seed(0)
    model = make().double().eval()  # no dropout: both forwards must see the same network
    rows, limits = random_rows()
    plan = plan_prefixes(rows, limits, pad_id=0, min_saving=0.0)
    ids, mask = padded(rows)
    weights = torch.arange(1, len(rows) + 1, dtype=torch.float64)  # a loss that weighs rows differently

    shared = shared_prefix_forward(model, plan, output_hidden_states=True)
    loss = sum(weights[i] * shared.logits[i, : len(r) - int(plan.starts[i]) + 1].sin().sum() for i, r in enumerate(rows))
    loss.backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected = sum(weights[i] * plain.logits[i, int(plan.starts[i]) - 1 : len(r)].sin().sum() for i, r in enumerate(rows))
    expected.backward()

    for i, row in enumerate(rows):
        s, n = int(plan.starts[i]), len(row) - int(plan.starts[i])
        torch.testing.assert_close(shared.logits[i, : 1 + n], plain.logits[i, s - 1 : len(row)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(shared.hidden[i, : 1 + n], plain.hidden_states[-1][i, s - 1 : len(row)], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, expected)
    for got, p in zip(shared_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)  # eager attention softmaxes in fp32


def test_sequence_classifier_reads_the_same_last_token():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(num_labels=1)).double()
    rows, _ = random_rows()
    rows[1] = rows[1] + [0, 0]  # a row ending in pad-valued tokens (EOS = pad): read before them
    from alignloop.train.reward import last_real_token

    plan = plan_prefixes(rows, [last_real_token(r, 0) for r in rows], pad_id=0, min_saving=0.0)
    assert plan is not None and int(plan.starts[1]) == 20
    ids, mask = padded(rows)
    torch.testing.assert_close(shared_prefix_forward(model, plan, causal_lm=False).logits,
                               model(input_ids=ids, attention_mask=mask).logits)


def test_dpo_log_probs_are_the_same_with_and_without_sharing():
    from alignloop.train.preference import completion_logps, sequence_logps_of

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).double()
    rows, limits = random_rows()
    examples = [Example(r, [0] * k + [1] * (len(r) - k)) for r, k in zip(rows, limits)]
    shared, counts = completion_logps(model, examples, 0, torch.device("cpu"), share_prefixes=True)
    plain, plain_counts = completion_logps(model, examples, 0, torch.device("cpu"), share_prefixes=False)
    torch.testing.assert_close(shared, plain)
    assert counts.tolist() == plain_counts.tolist() == [len(r) - k for r, k in zip(rows, limits)]
    cached = sequence_logps_of(model, examples, 0, batch_size=4, share_prefixes=True)
    torch.testing.assert_close(cached, plain.double())


def test_rl_scores_and_values_are_the_same_with_and_without_sharing():
    from alignloop.rollout.scoring import Batch, score_tokens

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).double()
    rows, limits = random_rows()
    batch = Batch.build([r[:k] for r, k in zip(rows, limits)], [r[k:] for r, k in zip(rows, limits)], 0, torch.device("cpu"))
    head = torch.nn.Linear(32, 1)  # the value head computes in fp32, as in training
    shared = score_tokens(model, batch, 0.7, head, with_entropy=True, share_prefixes=True)
    plain = score_tokens(model, batch, 0.7, head, with_entropy=True, share_prefixes=False)
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a * batch.mask, b * batch.mask)


def test_reward_batch_rewards_are_the_same_with_and_without_sharing():
    from alignloop.models.reward import Encoded
    from alignloop.train.reward import RewardExample, batch_rewards, collate_examples

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(num_labels=1)).double()
    rows, _ = random_rows()
    examples = [RewardExample(Encoded(rows[0], None, False), Encoded(rows[1], None, False), 0.0),
                RewardExample(Encoded(rows[3], None, False), Encoded(rows[4], None, False), 0.0),
                RewardExample(Encoded(rows[2], None, False), Encoded(rows[5], None, False), 0.0)]
    shared = collate_examples(examples, 0, "cpu", groups=1, share_prefixes=True)
    assert "plan" in shared["inputs"][0]
    plain = collate_examples(examples, 0, "cpu", groups=1, share_prefixes=False)
    torch.testing.assert_close(batch_rewards(model, shared), batch_rewards(model, plain))


def test_no_sharing_under_gradient_checkpointing_or_ddp_and_no_deprecation_warning():
    import warnings

    from alignloop.models.load import enable_checkpointing
    from alignloop.models.prefix import can_share_prefixes

    model = LlamaForCausalLM(llama_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check must not use transformers' deprecated property
        assert can_share_prefixes(model)
        enable_checkpointing(model)
        assert not can_share_prefixes(model)  # checkpointing turns the KV cache off in training
