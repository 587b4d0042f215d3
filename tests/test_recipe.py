"""Recipes: the shipped files are valid, bad keys and values are named, overrides are read as YAML."""

from pathlib import Path

import pytest

from loramix.recipe import Recipe, Training, apply_override, load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("lora", "soft", "topk", "remix", "task", "prompt", "contrastive")
MEDICAL = ["pubmedqa", "mediqa_rqe", "medical_abstracts", "symptom2disease", "ncbi_disease"]


def recipe(**values) -> Recipe:
    return Recipe.from_dict({"name": "r", "tasks": ["pubmedqa"], "mixlora": {"target_modules": "all-linear"}} | values)


@pytest.mark.parametrize("name", [*METHODS, *(f"{m}-full" for m in METHODS)])
def test_every_method_ships_a_valid_recipe_for_the_medical_tasks(name):
    loaded = load_recipe(CONFIGS / f"{name}.yaml")
    assert loaded.name == name and loaded.model == "SmolLM2-135M-Instruct" and loaded.tasks == MEDICAL
    method = name.removesuffix("-full")
    if method == "lora":
        assert loaded.lora["r"] == 8 and loaded.mixlora is None
    else:
        config = loaded.mixlora_config()
        assert config.router == {"contrastive": "topk"}.get(method, method)
        assert (config.contrastive_loss_weight > 0) == (method == "contrastive")


@pytest.mark.parametrize("name", ["adalink", "alora", "iapt", "pedro"])
def test_every_other_method_ships_a_demo_recipe_with_the_demo_budget(name):
    loaded, demo = load_recipe(CONFIGS / f"{name}.yaml"), load_recipe(CONFIGS / "topk.yaml")  # make demo's
    assert loaded.method_name == name and loaded.adapter_config().method == name
    assert (loaded.model, loaded.tasks, loaded.training) == (demo.model, demo.tasks, demo.training)
    assert (loaded.eval_examples, loaded.eval_mode, loaded.max_length) == (demo.eval_examples, "choices", 160)


def test_the_continual_recipe_names_the_run_it_needs_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/task-4 here
    with pytest.raises(ValueError, match=r"continue_from='runs/task-4' is invalid: expected a finished run folder"):
        load_recipe(CONFIGS / "continual.yaml")


def test_full_recipes_train_longer_on_longer_inputs_and_whole_test_sets():
    for method in METHODS:
        demo, full = load_recipe(CONFIGS / f"{method}.yaml"), load_recipe(CONFIGS / f"{method}-full.yaml")
        assert full.training.steps > demo.training.steps and full.max_length > demo.max_length
        assert full.eval_examples is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"training": {"steps": 0}}, r"training.steps=0 is invalid: expected a number >= 1"),
        ({"training": {"steps": 2.5}}, r"training.steps=2.5 is invalid: expected int"),
        ({"training": {"bf16": "yes"}}, r"training.bf16='yes' is invalid: allowed: true, false, auto"),
        ({"training": {"bf16": 1}}, r"training.bf16=1 is invalid: expected bool \| str"),
        ({"training": {"schedule": "wavy"}}, r"training.schedule='wavy' is invalid: allowed: \['cosine'"),
        ({"training": {"sharding": "zero3"}}, r"training.sharding='zero3' is invalid: allowed: \['none', 'fsdp'\]"),
        (
            {"mixlora": None, "lora": {"r": 8}, "training": {"sharding": "fsdp"}},
            r"training.sharding='fsdp' is invalid: sharding trains `mixlora:` recipes",
        ),
        ({"training": {"stepz": 3}}, r"training.stepz=3 is invalid: unknown key; allowed: \[.*'steps'"),
        ({"training": {"lr": "fast"}}, r"training.lr='fast' is invalid: expected float"),
        ({"sampling": "random"}, r"sampling='random' is invalid: allowed: \['proportional'"),
        ({"batching": "sorted"}, r"batching='sorted' is invalid: allowed: \['mixed', 'task'\]"),
        ({"system_prompt": 3}, r"system_prompt=3 is invalid: expected str \| None"),
        ({"tasks": ["nope"]}, r"tasks='nope' is invalid: unknown task 'nope'"),
        ({"tasks": []}, r"tasks=\[\] is invalid"),
        ({"max_length": 4}, r"max_length=4 is invalid"),
        ({"epochs": 3}, r"epochs=3 is invalid: unknown key"),
        ({"mixlora": {"target_modules": "all-linear", "top_k": 9}}, r"mixlora: MixLoraConfig.top_k=9 is invalid"),
        ({"mixlora": {"target_modules": "all-linear", "topk": 1}}, r"mixlora.topk=1 is invalid: unknown key"),
        ({"mixlora": None, "lora": {"rank": 8}}, r"lora.rank=8 is invalid: unknown key; allowed: \[.*'r'"),
        ({"mixlora": None, "lora": {"r": 0}}, r"lora.r=0 is invalid: expected an integer >= 1"),
        ({"lora": {"r": 8}}, r"give exactly one adapter section"),
        ({"mixlora": None}, r"give exactly one adapter section"),
    ],
)
def test_bad_keys_and_values_are_named_with_what_is_allowed(values, message):
    with pytest.raises(ValueError, match=message):
        recipe(**values)


def test_numbers_yaml_reads_as_strings_are_accepted():
    assert Training(lr="1e-3").lr == 0.001  # PyYAML reads 1e-3 (no dot) as a string


def test_overrides_are_dotted_and_read_as_yaml():
    overrides = ["training.steps=7", "mixlora.top_k=1", "eval_examples=null", "tasks=[pubmedqa, ncbi_disease]"]
    loaded = load_recipe(CONFIGS / "remix.yaml", overrides)
    assert loaded.training.steps == 7 and loaded.mixlora["top_k"] == 1 and loaded.eval_examples is None
    assert loaded.tasks == ["pubmedqa", "ncbi_disease"] and loaded.mixlora["num_tasks"] == 2
    with pytest.raises(ValueError, match="expected key=value"):
        load_recipe(CONFIGS / "remix.yaml", ["training.steps"])
    with pytest.raises(ValueError, match="'steps' is not a section"):
        apply_override({"steps": 3}, "steps.x=1")


def test_the_resolved_recipe_round_trips_through_yaml(tmp_path):
    loaded = load_recipe(CONFIGS / "task.yaml", ["training.lr=1e-4"])
    loaded.to_yaml(tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == loaded and again.training.lr == 1e-4


def test_task_ids_cover_the_recipe_tasks():
    assert load_recipe(CONFIGS / "task.yaml").mixlora_config().num_tasks == 5
    with pytest.raises(ValueError, match="mixlora.num_tasks=2 is invalid"):
        load_recipe(CONFIGS / "task.yaml", ["mixlora.num_tasks=2"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recipe at"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("training: [1, 2")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("mixlora: {target_modules: all-linear}\n")
    with pytest.raises(ValueError, match="lists no `tasks`"):
        load_recipe(tmp_path / "empty.yaml")
