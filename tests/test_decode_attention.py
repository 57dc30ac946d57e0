"""Decode attention (rollout/attention.py): on a decode step it equals transformers' SDPA function,
with and without a shared prompt, under grouped-query attention, with boolean and additive masks;
anything else goes to SDPA itself; switched on in ``generate``, an RL group's samples come out
the same as with it off, and the shared-prompt path is really taken."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import alignloop.rollout.generate as generate_module
from alignloop.rollout.attention import NAME, SharedPrompt, decode_attention, decode_step_attention
from alignloop.rollout.generate import Sampling, generate


class Layer(torch.nn.Module):
    """What the attention functions read off the calling module."""

    def __init__(self, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.layer_idx = 0
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads


def decode_inputs(rows: int, heads: int, kv_heads: int, length: int, samples: int, width: int, dtype: torch.dtype, seed: int = 0):
    """A decode step's query and cache, rows in runs of ``samples`` whose first ``width`` key/value
    columns are equal (one prompt's), with left padding on some rows and a hole in the middle of
    others; and the :class:`SharedPrompt` that says so (layer 0's prompts alone)."""
    g = torch.Generator().manual_seed(seed)
    dim = 16

    def cache() -> torch.Tensor:
        prompt = torch.randn(rows // samples, kv_heads, width, dim, generator=g).repeat_interleave(samples, 0)
        return torch.cat([prompt, torch.randn(rows, kv_heads, length - width, dim, generator=g)], dim=2).to(dtype)

    query = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
    key, value = cache(), cache()
    mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    mask[:samples, ..., : width // 3] = False  # the first group's prompt is left-padded
    mask[-1, ..., width + 2 : width + 4] = False  # a finished row's pads
    shared = SharedPrompt(samples, width, [key[::samples, :, :width].contiguous()], [value[::samples, :, :width].contiguous()])
    return query, key, value, mask, shared


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared-prompt"])
def test_decode_step_equals_sdpa_fp32(kv_heads: int, shared: bool) -> None:
    heads, samples, width = 4, 3, 11
    query, key, value, mask, prompt = decode_inputs(6, heads, kv_heads, 20, samples, width, torch.float32)
    layer = Layer(heads, kv_heads)
    expected, _ = sdpa_attention_forward(layer, query, key, value, mask)
    got, weights = decode_step_attention(layer, query, key, value, mask, shared_prompt=prompt if shared else None)
    assert weights is None
    assert got.shape == expected.shape == (6, 1, heads, 16)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # An additive mask (0 / −inf) means the same as the boolean one.
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    got_additive, _ = decode_step_attention(layer, query, key, value, additive, shared_prompt=prompt if shared else None)
    torch.testing.assert_close(got_additive, expected, atol=1e-6, rtol=1e-5)


def test_shared_prompt_is_read_from_the_prompts_alone() -> None:
    """With a shared prompt the prompt columns come from ``SharedPrompt``, not the rows: spoil the
    rows' copies and the output does not change, while the plain path's does (so the cascade
    really ran); a module without a layer index takes the plain path."""
    heads, samples, width = 4, 2, 9
    query, key, value, mask, prompt = decode_inputs(4, heads, heads, 15, samples, width, torch.float32)
    layer = Layer(heads, heads)
    before, _ = decode_step_attention(layer, query, key, value, mask, shared_prompt=prompt)
    spoiled_key, spoiled_value = key.clone(), value.clone()
    spoiled_key[:, :, :width] = 7.0
    spoiled_value[:, :, :width] = -7.0
    after, _ = decode_step_attention(layer, query, spoiled_key, spoiled_value, mask, shared_prompt=prompt)
    plain, _ = decode_step_attention(layer, query, spoiled_key, spoiled_value, mask)
    torch.testing.assert_close(after, before)
    assert not torch.allclose(plain, before)
    del layer.layer_idx
    unindexed, _ = decode_step_attention(layer, query, spoiled_key, spoiled_value, mask, shared_prompt=prompt)
    torch.testing.assert_close(unindexed, plain)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_decode_step_bf16_as_close_as_sdpa_bf16(kv_heads: int) -> None:
    """In bf16 both differ from the fp32 answer by rounding; ours (scores rounded to bf16 once, a
    fp32 softmax) stays within a few times SDPA's own bf16 error."""
    heads, samples, width = 4, 3, 40
    query, key, value, mask, prompt = decode_inputs(6, heads, kv_heads, 64, samples, width, torch.bfloat16, seed=1)
    layer = Layer(heads, kv_heads)
    exact, _ = sdpa_attention_forward(layer, query.float(), key.float(), value.float(), mask)
    sdpa_error = (sdpa_attention_forward(layer, query, key, value, mask)[0].float() - exact).abs().max()
    for shared in (None, prompt):
        got, _ = decode_step_attention(layer, query, key, value, mask, shared_prompt=shared)
        assert got.dtype == torch.bfloat16
        assert (got.float() - exact).abs().max() <= 4 * sdpa_error + 1e-3


def test_anything_but_a_decode_step_goes_to_sdpa() -> None:
    """A prefill (several queries), dropout, or a sliding window: SDPA's answer, bit for bit."""
    layer = Layer(4, 4)
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    expected, _ = sdpa_attention_forward(layer, query, key, value, causal)
    prompt = SharedPrompt(2, 3, [key[::2, :, :3]], [value[::2, :, :3]])
    got, _ = decode_step_attention(layer, query, key, value, causal, shared_prompt=prompt)
    assert torch.equal(got, expected)
    one = query[:, :, -1:]
    windowed, _ = decode_step_attention(layer, one, key, value, None, sliding_window=4)
    assert torch.equal(windowed, sdpa_attention_forward(layer, one, key, value, None, sliding_window=4)[0])


def gqa_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_switch_is_scoped_and_only_for_sdpa_models(builtin_tok: Any) -> None:
    model = gqa_model(len(builtin_tok))
    with decode_attention(model) as switched:
        assert switched and model.config._attn_implementation == NAME
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), decode_attention(model):
        raise RuntimeError("a failed rollout")
    assert model.config._attn_implementation == "sdpa"  # restored on error too
    model.config._attn_implementation = "eager"
    with decode_attention(model) as switched:
        assert not switched and model.config._attn_implementation == "eager"


@contextmanager
def switched_off(model: Any) -> Iterator[bool]:
    yield False


def test_generate_groups_same_with_and_without(builtin_tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An RL batch (prompts of different lengths, 3 samples each, interleaved in the input, some
    stopping early): the same tokens and log-probs with decode attention as with plain SDPA, and
    the decode steps did get the shared prompt."""
    model = gqa_model(len(builtin_tok))
    texts = ["Hi there", "What is your favourite food and why?", "Tell me a story about a dog"]
    prompts = [texts[i % 3] for i in range(9)]  # samples of a prompt are not adjacent in the input
    sampling = Sampling(max_new_tokens=16, temperature=1.0, seed=3)

    calls: list[SharedPrompt | None] = []

    def spy(*args: Any, shared_prompt: SharedPrompt | None = None, **kwargs: Any) -> Any:
        if args[1].shape[2] == 1:
            calls.append(shared_prompt)
        return decode_step_attention(*args, shared_prompt=shared_prompt, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, spy)
    on = generate(model, builtin_tok, prompts, sampling, batch_size=9)
    assert calls and all(c is not None and c.samples == 3 for c in calls)
    monkeypatch.setattr(generate_module, "decode_attention", switched_off)
    off = generate(model, builtin_tok, prompts, sampling, batch_size=9)
    assert on.completion_ids == off.completion_ids
    for a, b in zip(on.logprobs, off.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"
