"""Built-in tiny models for offline use: Llama architectures from config, randomly initialised,
with a byte-level BPE tokenizer trained on the embedded chitchat corpus.

No package on PyPI ships a causal LM's weights, so alignloop ships one small trained model of its
own, ``chitchat-5m`` (``SHIPPED``: the demo's base model, trained from ``tiny-5m`` by alignloop's
own stages; its folder's README.md says how), and the other offline starts are trained from
scratch by ``alignloop pretrain``: the tokenizer is trained here in a few seconds (cached under
``$ALIGNLOOP_CACHE``, default ``~/.cache/alignloop``) and given a ChatML chat template. Everything
saved from a built-in start is a plain HF folder that later stages load like any other model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILTIN_SIZES: dict[str, dict[str, int]] = {
    # Llama: RMSNorm, SwiGLU, RoPE; tied embeddings keep the tiny ones mostly transformer.
    "tiny-1m": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "tiny-5m": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4),
    "tiny-20m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6),
}
# Trained models that ship inside the package, by name: plain HF folders (bf16 safetensors, tokenizer).
SHIPPED: dict[str, Path] = {"chitchat-5m": Path(__file__).parent / "weights" / "chitchat-5m"}
CONTEXT_LENGTH = 512
TOKENIZER_VOCAB = 4096
TOKENIZER_NAME = f"chitchat-bpe-{TOKENIZER_VOCAB}"

EOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"

# ChatML, as Qwen and others use it: each turn is "<|im_start|>role\ncontent<|im_end|>\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNLOOP_CACHE", Path.home() / ".cache" / "alignloop"))


def builtin_tokenizer() -> Any:
    """The chitchat BPE tokenizer with a ChatML template, trained once and cached."""
    from transformers import AutoTokenizer

    folder = cache_dir() / TOKENIZER_NAME
    if not (folder / "tokenizer.json").is_file():
        _train_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def _train_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from alignloop.data.builtin import chitchat_conversations

    texts = ("\n".join(text for _, text in conv) for conv in chitchat_conversations())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[EOS, PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = CONTEXT_LENGTH
    # Write to a temporary folder and rename, so a concurrent or interrupted run never sees half a tokenizer.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tok-"))
    fast.save_pretrained(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def builtin_config(name: str, tokenizer: Any) -> Any:
    """The ``LlamaConfig`` of a built-in size, sized to ``tokenizer``."""
    from transformers import LlamaConfig

    size = BUILTIN_SIZES[name]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=size["num_attention_heads"],
        max_position_embeddings=CONTEXT_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **size,
    )


def builtin_model(name: str, tokenizer: Any) -> Any:
    """A randomly initialised Llama of the named size (seed it before calling)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    model = LlamaForCausalLM(builtin_config(name, tokenizer))
    # Chat turns end with <|im_end|>, documents with <|endoftext|>: generation stops at either.
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model
