"""The generation engine: greedy decoding equals HF's ``model.generate`` token for token (left
padding, positions, KV cache), log-probs equal teacher forcing, sampling is seeded per row (same
model twice, any batch size: same completions), stop tokens cut completions where they should."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from alignloop.errors import ConfigError, ModelError
from alignloop.rollout.generate import (
    Sampling,
    RowSampling,
    TokenSampler,
    default_stop_token_ids,
    encode_prompts,
    generate,
)
from alignloop.rollout.scoring import token_logprobs

EOS, IM_END = "<|endoftext|>", "<|im_end|>"

TEXT_PROMPTS = [
    "Hi",
    "How are you doing today, my friend?",
    "What is your favourite food and why do you like it so much?",
    "Tell me",
    "I went to the park yesterday and saw a dog.",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What do you like to do on weekends?"}],
    [{"role": "user", "content": "Do you have any pets at home?"}],
]
GREEDY = Sampling(max_new_tokens=12, temperature=0.0)


def load_model(folder: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> Any:
    """The tiny model (shared by the module: tests that add hooks remove them)."""
    return load_model(tiny_model_dir)


def hf_greedy(model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``model.generate(do_sample=False)`` on one left-padded batch, each row cut after its first stop token."""
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
    )
    stops = set(default_stop_token_ids(model, tokenizer))
    rows = []
    for row in out[:, width:].tolist():
        cut = next((k + 1 for k, token in enumerate(row) if token in stops), len(row))
        rows.append(row[:cut])
    return rows


# --- greedy decoding equals HF ---------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [TEXT_PROMPTS, CHAT_PROMPTS], ids=["text", "chat"])
def test_greedy_equals_hf_generate(model, builtin_tok, prompts):
    ours = generate(model, builtin_tok, prompts, GREEDY, batch_size=8)
    assert ours.prompt_ids == encode_prompts(builtin_tok, prompts)
    assert len({len(ids) for ids in ours.prompt_ids}) > 1  # different lengths: left padding is exercised
    assert ours.completion_ids == hf_greedy(model, builtin_tok, ours.prompt_ids, GREEDY.max_new_tokens)
    # One prompt at a time (no padding at all) gives the same tokens.
    assert generate(model, builtin_tok, prompts, GREEDY, batch_size=1).completion_ids == ours.completion_ids


def test_chat_prompt_ends_with_the_assistant_header(builtin_tok):
    (ids,) = encode_prompts(builtin_tok, [CHAT_PROMPTS[0]])
    assert builtin_tok.decode(ids) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_chat_prompt_without_a_chat_template_is_refused(no_chat_template_model_dir, model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(no_chat_template_model_dir))
    with pytest.raises(ModelError, match="no chat template"):
        generate(model, tokenizer, CHAT_PROMPTS, GREEDY)
    # Plain strings need no template.
    assert len(generate(model, tokenizer, TEXT_PROMPTS[:2], GREEDY).completions) == 2


# --- log-probs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [GREEDY, Sampling(max_new_tokens=12, temperature=1.0, seed=3)],
    ids=["greedy", "temperature-1"],
)
def test_logprobs_equal_teacher_forcing(model, builtin_tok, sampling):
    out = generate(model, builtin_tok, TEXT_PROMPTS + CHAT_PROMPTS, sampling, batch_size=3)
    forced = token_logprobs(model, out.prompt_ids, out.completion_ids, batch_size=3)
    assert [len(row) for row in forced] == [len(row) for row in out.completion_ids]
    for ours, theirs in zip(out.logprobs, forced):
        assert ours == pytest.approx(theirs, abs=1e-4)
    assert all(lp <= 0 for row in out.logprobs for lp in row)


def test_token_logprobs_batching_and_empty_completions(model, builtin_tok):
    prompts = encode_prompts(builtin_tok, TEXT_PROMPTS)
    completions = [[5, 6, 7], [], [8], [9, 10, 11, 12, 13], [14, 15]]
    batched = token_logprobs(model, prompts, completions, batch_size=16)
    single = token_logprobs(model, prompts, completions, batch_size=1)
    assert batched[1] == []
    for a, b in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-5)


def test_filtered_sampling_logprobs_are_of_the_filtered_distribution(model, builtin_tok):
    greedy = generate(model, builtin_tok, TEXT_PROMPTS, GREEDY)
    for sampling in (Sampling(max_new_tokens=12, top_k=1), Sampling(max_new_tokens=12, top_p=1e-6)):
        out = generate(model, builtin_tok, TEXT_PROMPTS, sampling)
        assert out.completion_ids == greedy.completion_ids
        assert all(lp == pytest.approx(0.0, abs=1e-6) for row in out.logprobs for lp in row)


# --- seeding -------------------------------------------------------------------------------------


def test_sampling_is_seeded_per_row(tiny_model_dir, model, builtin_tok):
    prompts = TEXT_PROMPTS + CHAT_PROMPTS
    sampling = Sampling(max_new_tokens=16, temperature=1.0, seed=7)
    first = generate(model, builtin_tok, prompts, sampling, batch_size=8)
    again = generate(load_model(tiny_model_dir), builtin_tok, prompts, sampling, batch_size=8)
    assert again.completion_ids == first.completion_ids
    assert generate(model, builtin_tok, prompts, sampling, batch_size=1).completion_ids == first.completion_ids
    # A subset with the same sample ids gets the same completions, whatever else is in the batch.
    subset = generate(model, builtin_tok, prompts[2:5], sampling, sample_ids=[2, 3, 4])
    assert subset.completion_ids == first.completion_ids[2:5]
    other_seed = generate(model, builtin_tok, prompts, Sampling(max_new_tokens=16, temperature=1.0, seed=8))
    assert sum(a != b for a, b in zip(other_seed.completion_ids, first.completion_ids)) >= len(prompts) - 1
    # Different sample ids for the same prompt give different samples.
    twice = generate(model, builtin_tok, [prompts[0]] * 2, sampling, sample_ids=[0, 1])
    assert twice.completion_ids[0] != twice.completion_ids[1]


def test_sampler_draws_from_the_filtered_distribution():
    rows = 4000
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(rows, 3).clone()

    def frequencies(sampling: Sampling) -> list[float]:
        sampler = TokenSampler([RowSampling.from_config(sampling, i) for i in range(rows)], 3, torch.device("cpu"))
        token, _ = sampler(logits, list(range(rows)))
        counts = Counter(token.tolist())
        return [counts[v] / rows for v in range(3)]

    assert frequencies(Sampling()) == pytest.approx([0.5, 0.3, 0.2], abs=0.03)
    # top_p=0.7: the tokens above the third already hold 0.8 ≥ 0.7, so it is dropped.
    assert frequencies(Sampling(top_p=0.7)) == pytest.approx([0.625, 0.375, 0.0], abs=0.03)
    assert frequencies(Sampling(top_k=1)) == [1.0, 0.0, 0.0]
    # Temperature 2 flattens: p ∝ sqrt(probs).
    flat = probs.sqrt() / probs.sqrt().sum()
    assert frequencies(Sampling(temperature=2.0)) == pytest.approx(flat.tolist(), abs=0.03)


def test_rows_with_different_settings_sample_as_they_would_alone():
    """A served batch mixes requests: each row's tokens and log-probs equal those of a batch
    where every row has that row's settings, and rows can leave and join between steps."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    settings = [RowSampling(1.0, 1.0, 0, 3, 0), RowSampling(0.0), RowSampling(0.7, 0.8, 0, 5, 1), RowSampling(1.3, 1.0, 7, 9, 2)]
    mixed = TokenSampler(settings, 50, torch.device("cpu"))
    token, logp = mixed(logits, range(4))
    for r, row in enumerate(settings):
        alone, alone_logp = TokenSampler([row], 50, torch.device("cpu"))(logits[r : r + 1], [0])
        assert token[r] == alone[0] and torch.allclose(logp[r], alone_logp[0])
    # Row 2 leaves, a new row joins: row 3 continues its own stream (its second draw).
    mixed.select([0, 1, 3])
    mixed.extend(TokenSampler([RowSampling(1.0, 1.0, 0, 11, 0)], 50, torch.device("cpu")))
    second, _ = mixed(logits[[0, 1, 3, 2]], range(4))
    alone = TokenSampler([settings[3]], 50, torch.device("cpu"))
    alone(logits[3:4], [0])
    assert second[2] == alone(logits[3:4], [0])[0][0]
    assert second[1] == logits[1].argmax()


# --- stopping --------------------------------------------------------------------------------------


def test_completions_are_cut_at_the_first_stop_token(model, builtin_tok):
    sampling = Sampling(max_new_tokens=12, temperature=1.0, seed=5)  # sampled: greedy on a random model loops
    free = generate(model, builtin_tok, TEXT_PROMPTS, sampling, stop_token_ids=())
    assert all(len(ids) == sampling.max_new_tokens for ids in free.completion_ids)
    assert not any(free.finished)
    # A stop token that row 0 first produces at step ≥ 2 (a plain token, so decoding would keep it).
    row = free.completion_ids[0]
    at = next(k for k in range(2, len(row)) if row[k] not in row[:k])
    stop = row[at]

    cut = generate(model, builtin_tok, TEXT_PROMPTS, sampling, stop_token_ids=[stop])
    for ids, free_ids, finished, text in zip(cut.completion_ids, free.completion_ids, cut.finished, cut.completions):
        if stop in free_ids:
            k = free_ids.index(stop)
            assert ids == free_ids[: k + 1] and finished
            assert text == builtin_tok.decode(free_ids[:k], skip_special_tokens=True)
        else:
            assert ids == free_ids and not finished
            assert text == builtin_tok.decode(free_ids, skip_special_tokens=True)
    assert cut.completion_ids[0] == row[: at + 1]
    assert cut.logprobs[0] == pytest.approx(free.logprobs[0][: at + 1], abs=1e-6)


@pytest.mark.parametrize("stop", [EOS, IM_END])
def test_a_stop_token_ends_generation(model, builtin_tok, stop):
    """Both the tokenizer's EOS and the generation config's <|im_end|> stop; the loop ends as soon
    as every row has stopped."""
    stop_id = builtin_tok.convert_tokens_to_ids(stop)
    bias = torch.zeros(model.config.vocab_size)
    bias[stop_id] = 100.0
    forwards = []
    hooks = [
        model.get_output_embeddings().register_forward_hook(lambda module, args, output: output + bias),
        model.register_forward_hook(lambda module, args, output: forwards.append(1)),
    ]
    try:
        out = generate(model, builtin_tok, TEXT_PROMPTS, Sampling(max_new_tokens=8), batch_size=8)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.completion_ids == [[stop_id]] * len(TEXT_PROMPTS)
    assert out.completions == [""] * len(TEXT_PROMPTS)
    assert out.finished == [True] * len(TEXT_PROMPTS)
    assert len(forwards) == 1  # the prefill only: no decode step after every row stopped


def test_max_new_tokens_and_modes(model, builtin_tok):
    model.train()
    out = generate(model, builtin_tok, TEXT_PROMPTS, Sampling(max_new_tokens=5), stop_token_ids=())
    assert model.training  # restored after generation (which ran in eval mode)
    model.eval()
    assert [len(ids) for ids in out.completion_ids] == [5] * len(TEXT_PROMPTS)
    assert [len(lps) for lps in out.logprobs] == [5] * len(TEXT_PROMPTS)
    empty = generate(model, builtin_tok, TEXT_PROMPTS, Sampling(max_new_tokens=0))
    assert empty.completion_ids == [[]] * len(TEXT_PROMPTS) and empty.completions == [""] * len(TEXT_PROMPTS)


def test_bad_sampling_settings_are_refused():
    with pytest.raises(ConfigError, match="temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ConfigError, match="top_k"):
        Sampling(top_k=-1)


# --- packed weights for the decode loop --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_linears_multiply_as_linear_and_leave_nothing_behind(dtype):
    from alignloop.rollout.packed import _kernels_work, decode_library, packed_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False)).to(dtype)
    x = torch.randn(8, 1, 64, dtype=dtype)
    with torch.inference_mode():
        plain = net(x)
        with packed_linears(net, rows=8):
            packs = _kernels_work(dtype, decode_library(net[0], 8))
            assert all(("forward" in layer.__dict__) == packs for layer in (net[0], net[2]))
            packed = net(x)
        if dtype == torch.bfloat16:
            assert torch.equal(packed, plain)  # oneDNN gives F.linear's bits
        else:
            torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        assert not any("forward" in layer.__dict__ for layer in net)
        with pytest.raises(KeyError), packed_linears(net, rows=8):
            raise KeyError("an error inside the block")
        assert not any("forward" in layer.__dict__ for layer in net)  # restored on the way out too
        hooked = net[2].forward = lambda x: x  # a forward something else installed (an offloading hook)
        with packed_linears(net, rows=8):
            assert net[2].forward is hooked
        assert net[2].forward is hooked


def test_bf16_sampling_is_the_same_with_and_without_packed_weights(tiny_model_dir, builtin_tok, monkeypatch):
    import contextlib

    import alignloop.rollout.generate as engine

    bf16 = load_model(tiny_model_dir).to(torch.bfloat16)
    sampling = Sampling(max_new_tokens=16, temperature=1.0, seed=3)
    packed = generate(bf16, builtin_tok, TEXT_PROMPTS, sampling)
    monkeypatch.setattr(engine, "packed_linears", lambda model, rows: contextlib.nullcontext())
    plain = generate(bf16, builtin_tok, TEXT_PROMPTS, sampling)
    assert packed.completion_ids == plain.completion_ids
    assert packed.logprobs == plain.logprobs
