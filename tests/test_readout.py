"""A classifier's last layer run only where it reads: the same rewards and gradients as the plain
forward, for decoders (last token) and BERT-family encoders (first token), fewer positions through
the last feed-forward block, other heads left alone."""

import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from alignloop.models.prefix import plan_prefixes, shared_prefix_forward
from alignloop.models.readout import classifier_logits, read_positions, readout_of
from test_prefix import llama_config, padded, random_rows


def _llama_classifier():
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(llama_config(num_labels=1)).double()


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_logits_and_grads(model, run_fast, run_plain):
    fast, plain = run_fast(), run_plain()
    torch.testing.assert_close(fast, plain)
    weights = torch.linspace(-1, 1, fast.numel(), dtype=fast.dtype).view_as(fast)
    g_fast, g_plain = _grads(model, (run_fast() * weights).sum()), _grads(model, (run_plain() * weights).sum())
    assert g_fast.keys() == g_plain.keys() and len(g_fast) == len(list(model.parameters()))
    for name in g_plain:
        torch.testing.assert_close(g_fast[name], g_plain[name], msg=name)


def test_read_positions_follow_transformers_rule():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 6, 0, 0], [0, 0, 0, 0, 0], [4, 4, 4, 4, 4]])
    assert read_positions(ids, 0).tolist() == [2, 2, 0, 4]
    assert read_positions(ids, None).tolist() == [4, 4, 4, 4]
    assert read_positions(ids, 0, "first").tolist() == [0, 0, 0, 0]


def test_llama_classifier_rewards_and_gradients_match_the_plain_forward():
    model = _llama_classifier()
    rows, _ = random_rows()
    rows[1] = rows[1] + [0, 0]  # pad-valued tokens at the end (EOS = pad): read before them, as transformers does
    ids, mask = padded(rows)
    _assert_same_logits_and_grads(model, lambda: classifier_logits(model, input_ids=ids, attention_mask=mask),
                                  lambda: model(input_ids=ids, attention_mask=mask).logits)


def test_the_last_mlp_sees_one_position_a_row_and_is_restored():
    model = _llama_classifier()
    rows, _ = random_rows()
    ids, mask = padded(rows)
    layer = model.model.layers[-1]
    assert readout_of(model).reads == "last"
    mlp = layer.mlp
    seen = []
    hook = mlp.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    classifier_logits(model, input_ids=ids, attention_mask=mask)
    hook.remove()
    assert seen == [(len(rows), 32)]  # B rows of the hidden width, not B × T
    assert layer.mlp is mlp and not any("block" in n for n, _ in model.named_modules())


def test_shared_prefix_classifier_gradients_match_the_plain_forward():
    model = _llama_classifier()
    rows, _ = random_rows()
    from alignloop.train.reward import last_real_token

    plan = plan_prefixes(rows, [last_real_token(r, 0) for r in rows], pad_id=0, min_saving=0.0)
    ids, mask = padded(rows)
    _assert_same_logits_and_grads(model, lambda: shared_prefix_forward(model, plan, causal_lm=False).logits,
                                  lambda: model(input_ids=ids, attention_mask=mask).logits)


def test_gpt2_classifier_matches():
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                     num_labels=1, pad_token_id=0)).double().eval()
    assert readout_of(gpt2).blocks == [(gpt2.transformer.h[-1], "mlp")]
    rows, _ = random_rows()
    ids, mask = padded(rows)
    _assert_same_logits_and_grads(gpt2, lambda: classifier_logits(gpt2, input_ids=ids, attention_mask=mask),
                                  lambda: gpt2(input_ids=ids, attention_mask=mask).logits)


def _bert(**kw):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    return config


def test_bert_classifier_reads_its_first_token_with_the_same_rewards_and_gradients():
    bert = BertForSequenceClassification(_bert(num_labels=1)).double().eval()
    rows, _ = random_rows()
    ids, mask = padded(rows)
    types = (torch.arange(ids.size(1)) > 10).long().expand_as(ids) * mask  # text pairs: two segments
    layer = bert.bert.encoder.layer[-1]
    seen = []
    hook = layer.intermediate.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    _assert_same_logits_and_grads(bert, lambda: classifier_logits(bert, input_ids=ids, attention_mask=mask, token_type_ids=types),
                                  lambda: bert(input_ids=ids, attention_mask=mask, token_type_ids=types).logits)
    hook.remove()
    assert seen[0] == (len(rows), 32) and seen[1] == (len(rows), ids.size(1), 32)  # read-out only, then the plain forward


def test_other_heads_are_left_alone():
    from transformers import BertForTokenClassification

    tagger = BertForTokenClassification(_bert(num_labels=3)).eval()  # reads every position
    assert readout_of(tagger) is None
    rows, _ = random_rows()
    ids, mask = padded(rows)
    torch.testing.assert_close(classifier_logits(tagger, input_ids=ids, attention_mask=mask),
                               tagger(input_ids=ids, attention_mask=mask).logits)


def test_threads_scoring_with_one_model_get_their_own_rewards():
    import time
    from concurrent.futures import ThreadPoolExecutor

    model = _llama_classifier().eval()
    rows, _ = random_rows()
    batches = [padded([rows[i], rows[j], rows[k]]) for i, j, k in ((0, 1, 2), (3, 4, 5), (5, 0, 3), (2, 4, 1))] * 3
    with torch.no_grad():
        expected = [model(input_ids=ids, attention_mask=mask).logits for ids, mask in batches]
        # a pause inside every forward lets the threads interleave: each must still read its own rows' positions
        model.model.layers[0].register_forward_pre_hook(lambda module, args: time.sleep(0.01))
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda b: classifier_logits(model, input_ids=b[0], attention_mask=b[1]), batches))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    assert type(model.model.layers[-1].mlp).__name__ == "LlamaMLP"  # every swap undone
