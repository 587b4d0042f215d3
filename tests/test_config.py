import pytest

from loramix import MixLoraConfig


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"router": "banana"}, "router", "'banana'"),
        ({"top_k": 9}, "top_k", "9"),
        ({"num_experts": 0}, "num_experts", "0"),
        ({"router": "task"}, "num_tasks", "None"),
        ({"router": "remix", "top_k": 8}, "top_k", "8"),
        ({"routing_level": "word"}, "routing_level", "'word'"),
        ({"router": "task", "num_tasks": 2, "routing_level": "sequence"}, "routing_level", "'sequence'"),
        ({"dropout": 1.5}, "dropout", "1.5"),
        ({"alpha": -1.0}, "alpha", "-1.0"),
        ({"remix_samples": 1}, "remix_samples", "1"),
        ({"remix_scaling": "sqrt"}, "remix_scaling", "'sqrt'"),
        ({"prompt_pooling": "max"}, "prompt_pooling", "'max'"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight", "-0.1"),
        ({"contrastive_loss_weight": 0.1, "router": "soft"}, "contrastive_loss_weight", "0.1"),
        ({"layers_to_transform": []}, "layers_to_transform", "[]"),
        ({"layers_to_transform": [1, -2]}, "layers_to_transform", "-2"),
    ],
)
def test_invalid_values_name_field_value_and_what_is_allowed(kwargs, field, shown):
    with pytest.raises(ValueError) as error:
        MixLoraConfig(["q_proj"], **kwargs)
    message = str(error.value)
    assert f"MixLoraConfig.{field}=" in message and shown in message


def test_unknown_router_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"allowed: \['prompt', 'remix', 'soft', 'task', 'topk'\]"):
        MixLoraConfig(["q_proj"], router="moe")


def test_target_modules_must_be_names():
    with pytest.raises(ValueError, match="target_modules"):
        MixLoraConfig([1, 2])
    with pytest.raises(ValueError, match="target_modules"):
        MixLoraConfig([])
    assert MixLoraConfig("q_proj").target_modules == ["q_proj"]
    assert MixLoraConfig("all-linear").target_modules == "all-linear"


def test_json_round_trip(tmp_path):
    config = MixLoraConfig(["q_proj", "v_proj"], router="task", num_tasks=5, expert_rank=2, alpha=8.0)
    config.to_json(tmp_path / "c.json")
    assert MixLoraConfig.from_json(tmp_path / "c.json") == config


def test_json_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        MixLoraConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "extra.json").write_text('{"target_modules": ["q_proj"], "experts": 3}')
    with pytest.raises(ValueError, match="experts"):
        MixLoraConfig.from_json(tmp_path / "extra.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        MixLoraConfig.from_json(tmp_path / "missing.json")
