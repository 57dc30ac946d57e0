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
from alignloop.models.builtin import BUILTIN_SIZES, SHIPPED, builtin_model, builtin_tokenizer
from alignloop.models.cpu_linear import use_onednn_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$", re.ASCII)


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

    name = shipped_or_given(cfg.tokenizer or cfg.name_or_path)
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
                shipped_or_given(cfg.name_or_path),
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
        model = add_lora(model, cfg, seed=seed)
    use_onednn_linears(model, cfg.cpu_linear)
    return model


def model_family(name: str, key: str, trust_remote_code: bool = False) -> tuple[str, list[str]]:
    """What the folder or Hub id ``name`` holds, read from its config (no weights loaded), and the
    config's ``architectures`` for messages: ``"causal_lm"`` (a text or chat model),
    ``"classifier"`` (a sequence or token classifier: labels), ``"reward"`` (a sequence
    classifier with one output: a score) or ``"other"`` (a bare encoder, a masked LM, ...).

    ``AutoModelForCausalLM`` loads the body of most of these and puts a new, random head on it
    without a word, so a caller that needs one family asks first. Built-in sizes are causal LMs."""
    if name in BUILTIN_SIZES:
        return "causal_lm", []
    name = shipped_or_given(name)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _check_reachable(name, key)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key} {name!r}: cannot read its config ({_first_line(e)})") from None
    architectures = list(config.architectures or [])
    if any(a.endswith("ForTokenClassification") for a in architectures):
        return "classifier", architectures
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return ("reward" if config.num_labels == 1 else "classifier"), architectures
    causal = {n for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([names] if isinstance(names, str) else names)}
    # Remote-code models are in no mapping: their class name says what they are.
    if any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm", architectures
    if not architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # an old config naming no class
        return "causal_lm", architectures
    return "other", architectures


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in the backward instead of keeping them (transformers ≥ 5.24 names it
    activation checkpointing; the older name still works there but warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def is_checkpointing(model: Any) -> bool:
    """Whether ``model`` recomputes activations in the backward (either transformers name)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def add_lora(model: Any, cfg: ModelConfig, task_type: str = "CAUSAL_LM", seed: int = 0) -> Any:
    """LoRA adapters on ``cfg.lora.target_modules``; for ``SEQ_CLS`` peft also trains the new head.

    The adapters' random init (LoRA's A; B starts at zero) draws from ``seed``, not from whatever
    state the global generator reached: a rerun starts from the same adapters, and so does every
    process of a sharded run, which cuts its shard from its own copy."""
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
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


def shipped_or_given(name: str) -> str:
    """The folder of a model that ships inside the package (``chitchat-5m``), else ``name`` as it is."""
    return str(SHIPPED[name]) if name in SHIPPED else name


def _check_reachable(name: str, key: str) -> None:
    """Refuse ``name`` before transformers tries it, when it cannot be loaded: a path that looks
    local but is not there would otherwise be sent to the Hub and blamed on the connection.

    A name is a local path when it starts with ``.``, ``/`` or ``~``, when its first part is a
    folder here (``runs/nope`` beside ``runs/``), or when it cannot be a Hub id (``a/b/c``); else
    it is a Hub id (``Qwen/Qwen2-0.5B``), which offline must already be in the Hugging Face cache."""
    if Path(shipped_or_given(name)).exists():
        return
    path = Path(name).expanduser()
    if path.exists():  # the shell expands ~ at a word's start only, not in --model.name_or_path=~/x
        raise ModelError(f"{key} {name!r}: write the folder as {str(path)!r}; ~ is not expanded here")
    first = Path(name).parts[0] if Path(name).parts else name
    local = name.startswith((".", "/", "~")) or (first != name and Path(first).expanduser().is_dir())
    if local or not _is_hub_id(name):
        raise ModelError(f"{key} {name!r}: no such folder ({path.absolute()} does not exist); "
                         f"give a model folder, a Hub id, the shipped {', '.join(SHIPPED)} or a built-in size ({', '.join(BUILTIN_SIZES)})")
    if _hub_offline() and not _in_hub_cache(name):
        raise ModelError(f"{key} {name!r}: no such folder here, and no Hub model of that name in the Hugging Face cache "
                         "(HF_HUB_OFFLINE is set, so the Hub was not asked)")


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub id (``org/name``): by our pattern and the Hub's own check."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return bool(_HUB_ID.match(name))


def _hub_offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a model's or a tokenizer's config for ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, file), str) for file in ("config.json", "tokenizer_config.json"))


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
