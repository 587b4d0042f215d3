"""Model cards: written by save_pretrained, by a run's evaluation and by export; read back by their metadata."""

import json

import yaml

import loramix
from loramix import MixLoraConfig
from loramix.card import run_card
from loramix.export import export_run
from loramix.models import tiny_llama
from loramix.recipe import Recipe

TASKS = ["pubmedqa", "mediqa_rqe"]
METRICS = {
    "tasks": {
        "pubmedqa": {"model": {"accuracy": 0.61, "accuracy_norm": 0.6}, "zero_shot": {"accuracy": 0.44}, "n": 200},
        "mediqa_rqe": {"model": {"accuracy": 0.52}, "zero_shot": None, "n": 200},
        "medqa_usmle": {"model": None, "n": 200},
    }
}


def metadata(text: str) -> dict:
    """The YAML block between the card's first two '---' lines."""
    _, block, _ = text.split("---\n", 2)
    return yaml.safe_load(block)


def test_save_pretrained_writes_a_card_and_keeps_a_users_own(tmp_path):
    config = MixLoraConfig("all-linear", router="remix", num_experts=4, expert_rank=2, top_k=2, remix_samples=3)
    model = loramix.wrap(tiny_llama(), config)
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert metadata(card)["library_name"] == "loramix"
    assert "ReMix" in card and "arXiv 2603.10160" in card and "routing samples (RLOO, M): 3" in card
    own = tmp_path / "mine"
    own.mkdir()
    (own / "README.md").write_text("# my notes\n")
    model.save_pretrained(own)
    assert (own / "README.md").read_text() == "# my notes\n"
    assert loramix.load(tiny_llama(), own).mixlora_config == config


def test_run_card_names_the_method_tasks_and_main_scores():
    config = MixLoraConfig("all-linear", router="task", num_experts=2, expert_rank=2, num_tasks=2)
    recipe = Recipe(name="r", model="SmolLM2-135M-Instruct", tasks=TASKS, mixlora=config.to_dict())
    card = run_card(recipe, METRICS)
    assert metadata(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "MOELoRA" in card and "Tasks: pubmedqa, mediqa_rqe." in card
    assert "| pubmedqa | accuracy | 0.610 | 0.440 | 200 |" in card  # the main (first) metric only
    assert "| mediqa_rqe | accuracy | 0.520 | — | 200 |" in card
    assert "medqa_usmle |" not in card
    lora = Recipe(name="l", model="tiny-llama", tasks=TASKS, lora={"r": 4})
    assert metadata(run_card(lora, METRICS))["library_name"] == "peft"


def test_export_writes_a_peft_card_with_the_tasks_scores(tmp_path):
    config = MixLoraConfig("all-linear", router="task", num_experts=2, expert_rank=2, num_tasks=2)
    model = loramix.wrap(tiny_llama(), config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Recipe(name="run", model="tiny-llama", tasks=TASKS, max_length=64, mixlora=config.to_dict()).to_yaml(
        run_dir / "recipe.yaml"
    )
    model.save_pretrained(run_dir / "adapter")
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    out = export_run(run_dir, "pubmedqa", tmp_path / "out")
    card = (out / "README.md").read_text()
    assert metadata(card)["library_name"] == "peft"
    assert "task id: 0" in card and "| pubmedqa | accuracy | 0.610 | 0.440 | 200 |" in card
    assert "mediqa_rqe |" not in card
