"""Loading and saving policy models: any Hugging Face id or local folder through the Auto
classes, or a built-in tiny config; optional LoRA through peft; dtypes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from alignloop.config import ModelConfig
from alignloop.errors import ModelError
from alignloop.models.builtin import BUILTIN_SIZES, builtin_model, builtin_tokenizer
from alignloop.models.cpu_linear import use_onednn_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def inference_device(device: str | None = None) -> torch.device:
    """Where no-grad scoring and generation run: ``device`` when given, else the GPU when there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout to 0: scores of a pair (reward models) or of a rollout and its update (RL)
    must come from the same function, not from two random masks."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer named by ``model.tokenizer``, else the model's own (built-ins: chitchat BPE)."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    if name in BUILTIN_SIZES:
        return builtin_tokenizer()
    where = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    _check_reachable(name, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{where} {name!r}: cannot load a tokenizer ({_first_line(e)})") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do; EOS is the
        # usual choice for models shipped without a pad token (GPT-2, Llama).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, tokenizer: Any, seed: int) -> Any:
    """The policy model: pretrained weights, or a seeded random init for a built-in size; LoRA
    adapters on top when ``model.lora.r > 0``."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path in BUILTIN_SIZES:
        torch.manual_seed(seed)
        model = builtin_model(cfg.name_or_path, tokenizer).to(dtype)
        model.config._attn_implementation = cfg.attn_implementation
    else:
        _check_reachable(cfg.name_or_path, "model.name_or_path")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
            )
        except (OSError, ValueError) as e:
            raise ModelError(f"model.name_or_path {cfg.name_or_path!r}: cannot load a causal LM ({_first_line(e)})") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {model.get_input_embeddings().num_embeddings}; "
            "use the model's own tokenizer"
        )
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora.r > 0:
        model = add_lora(model, cfg)
    use_onednn_linears(model, cfg.cpu_linear)
    return model


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in the backward instead of keeping them (transformers ≥ 5.24 names it
    activation checkpointing; the older name still works there but warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def is_checkpointing(model: Any) -> bool:
    """Whether ``model`` recomputes activations in the backward (either transformers name)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def add_lora(model: Any, cfg: ModelConfig, task_type: str = "CAUSAL_LM") -> Any:
    """LoRA adapters on ``cfg.lora.target_modules``; for ``SEQ_CLS`` peft also trains the new head."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules
    # A classifier's head is trained whole (peft's modules_to_save); "all-linear" would also put an
    # adapter on its linear layers, and peft refuses a module that is both.
    head = r"(.*\.)?(classifier|score)(\..*)?" if task_type in ("SEQ_CLS", "TOKEN_CLS") and targets == ["all-linear"] else None
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        exclude_modules=head,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ModelError(f"model.lora.target_modules {targets}: {_first_line(e)}") from None


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions allow, if its config says."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """Write an HF folder plain ``transformers`` loads. A LoRA model is saved merged into its base
    (and its adapter alone under ``adapter/``) so no peft is needed to use it."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(str(folder / "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _check_reachable(name: str, key: str) -> None:
    if Path(name).exists():
        return
    if _HUB_ID.match(name) and not name.startswith("."):
        return  # a Hub id: from_pretrained will fetch or find it in the cache
    raise ModelError(
        f"{key} {name!r}: no such folder, and not a built-in ({', '.join(BUILTIN_SIZES)}) or a Hub id"
    )


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
