"""fp32 linear layers on oneDNN (models/cpu_linear.py): the same numbers as ``F.linear``, forward
and backward, through copies, LoRA, autocast and rollout packing."""

import copy

import pytest
import torch

from alignloop.models.cpu_linear import has_onednn_forward, onednn_linear, onednn_works, use_onednn_linears
from alignloop.rollout.packed import packed_linears

pytestmark = pytest.mark.skipif(not onednn_works(), reason="this torch has no working oneDNN linear")


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_forward_and_backward_match_f_linear(with_bias, weight_grad):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, requires_grad=True)
    weight = torch.randn(40, 24, requires_grad=weight_grad)
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    grad = torch.randn(3, 7, 40)
    inputs = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    ours = onednn_linear(x, weight, bias)
    expected = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_gives_the_same_loss_and_gradients():
    plain, fast = _tiny_lm(), _tiny_lm()
    assert use_onednn_linears(fast, "onednn") == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    assert use_onednn_linears(plain, "torch") == 0
    ids = torch.randint(0, 64, (2, 12))
    losses = [model(input_ids=ids, labels=ids).loss for model in (plain, fast)]
    losses[0].backward(), losses[1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_deep_copy_uses_its_own_weights():
    model = _tiny_lm()
    use_onednn_linears(model, "onednn")
    copied = copy.deepcopy(model)
    assert has_onednn_forward(copied.lm_head)
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        copied.lm_head.weight.zero_()
        assert torch.equal(model(input_ids=ids).logits, before)  # the original's forward still reads its own weight
        assert copied(input_ids=ids).logits.abs().max() == 0


def test_lora_layers_and_a_frozen_base_train():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    plain, fast = get_peft_model(_tiny_lm(), lora), get_peft_model(_tiny_lm(), lora)
    assert use_onednn_linears(fast, "onednn") == 15 + 2 * 2 * 2  # the bases, and each adapter's A and B
    ids = torch.randint(0, 64, (2, 8))
    for model in (plain, fast):
        model(input_ids=ids, labels=ids).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert q.grad is None, name  # a frozen base's weight gradient is not computed
    assert any(p.grad.abs().sum() > 0 for n, p in fast.named_parameters() if "lora_B" in n)


def test_autocast_falls_back_to_f_linear():
    layer = torch.nn.Linear(16, 8)
    use_onednn_linears(layer, "onednn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 16)).dtype == torch.bfloat16


def test_rollout_packing_keeps_the_onednn_forward():
    model = _tiny_lm().eval()
    use_onednn_linears(model, "onednn")
    ids = torch.randint(0, 64, (4, 1))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        with packed_linears(model, rows=4):
            assert not has_onednn_forward(model.lm_head)  # packed inside the block
            packed = model(input_ids=ids).logits
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    assert has_onednn_forward(model.lm_head)  # and back afterwards


def test_decode_packing_follows_the_pin_and_otherwise_the_timing(monkeypatch):
    """fp32 decode products: a layer on oneDNN packs for oneDNN, one pinned to torch for MKL (so
    ``model.cpu_linear`` fixes the rounding of rollouts too), and an unpinned layer for whichever
    library the decode-sized timing picked."""
    import alignloop.rollout.packed as packing

    onednn, pinned, free = _tiny_lm(), _tiny_lm(), _tiny_lm()
    use_onednn_linears(onednn, "onednn")
    use_onednn_linears(pinned, "torch")
    assert packing.decode_library(onednn.lm_head, 8) == "onednn"
    assert packing.decode_library(pinned.lm_head, 8) == "mkl"
    assert packing.decode_library(copy.deepcopy(pinned).lm_head, 8) == "mkl"  # an RL reference keeps the pin
    for faster, library in ((True, "onednn"), (False, "mkl")):
        monkeypatch.setattr(packing, "onednn_packs_faster", lambda rows, faster=faster: faster)
        assert packing.decode_library(free.lm_head, 8) == library
    assert packing.decode_library(free.to(torch.bfloat16).lm_head, 8) == "onednn"


def test_auto_layers_follow_the_process_choice_wherever_it_comes_from(monkeypatch):
    """``cpu_linear: auto`` layers read this process's choice at each call, so a choice adopted from
    a checkpoint after the models are loaded moves every one of them, and the rollout packing with them."""
    from alignloop.models import cpu_linear
    import alignloop.rollout.packed as packing

    monkeypatch.setattr(cpu_linear, "_choices", {})
    onednn_products = []
    linear = cpu_linear._linear
    monkeypatch.setattr(cpu_linear, "_linear", lambda *args: onednn_products.append(1) or linear(*args))
    monkeypatch.setattr(cpu_linear, "_time_training_products", lambda: True)
    model = _tiny_lm()
    assert use_onednn_linears(model) == 15
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        model(input_ids=ids)
    assert len(onednn_products) == 15 and cpu_linear.chosen_kernels() == {"training": True}  # timed at the first product
    assert packing.decode_library(model.lm_head, 8) == "onednn"

    cpu_linear.adopt_kernels({"training": False, "decode_8_rows": False})
    onednn_products.clear()
    with torch.no_grad():
        model(input_ids=ids)
    assert not onednn_products
    monkeypatch.setattr(packing, "_time_decode_products", lambda rows: pytest.fail("adopted choices are not timed again"))
    assert packing.decode_library(model.lm_head, 8) == "mkl"
    assert cpu_linear.chosen_kernels() == {"training": False, "decode_8_rows": False}
