"""`training.report_to`: a run's figures in TensorBoard (read back with tensorboard's own reader) and W&B (offline)."""

import json
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import loramix.train as training
from loramix.recipe import Recipe
from loramix.tracking import scalars
from loramix.train import train


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tracked_recipe(task_file, report_to: list[str], **training) -> Recipe:
    settings = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 4, "dev_every": 2}
    return Recipe(
        name="tiny",
        model="tiny-llama",
        tasks=["parity", "parity2"],
        task_files=[str(task_file)],
        max_length=48,
        dev_examples=2,
        training=settings | training | {"report_to": report_to},
        mixlora={"target_modules": ["q_proj", "v_proj"], "router": "topk", "num_experts": 4, "expert_rank": 2},
    )


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scalars_flatten_every_number_but_the_step():
    record = {"step": 3, "loss": 1.5, "aux": {"balance": 0.25}, "load": {"m": [0.75, 0.25]}, "note": "x", "ok": True}
    assert scalars(record, "train/") == {
        "train/loss": 1.5,
        "train/aux/balance": 0.25,
        "train/load/m/0": 0.75,
        "train/load/m/1": 0.25,
    }


def test_tensorboard_shows_every_figure_of_the_history_and_the_learning_curve(tmp_path, task_file):
    run = train(tracked_recipe(task_file, ["tensorboard"]), tmp_path / "run", evaluate=False)
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    history, curve = read_lines(run / "history.jsonl"), read_lines(run / "learning_curve.jsonl")
    expected: dict[str, dict[int, float]] = {}
    for records, prefix in ((history, "train/"), (curve, "dev/")):
        for record in records:
            for tag, value in scalars(record, prefix).items():
                expected.setdefault(tag, {})[record["step"]] = value
    shown = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert set(shown) == set(expected)
    for tag, values in expected.items():
        assert shown[tag] == pytest.approx(values, rel=1e-6), tag  # stored as float32
    assert {"train/loss", "train/lr", "train/ess", "train/examples_per_second", "dev/tasks/parity/accuracy"} <= set(
        shown
    )
    assert any(tag.startswith("train/aux/") for tag in shown) and any("load_per_layer" in tag for tag in shown)
    assert all(h["examples_per_second"] > 0 for h in history)
    heatmaps = events.Images("expert_load")
    assert [image.step for image in heatmaps] == [2, 4]  # the dev points after the first step (step 0 routed nothing)
    assert heatmaps[0].encoded_image_string.startswith(b"\x89PNG")


def test_a_resumed_run_shows_each_step_once_with_its_final_values(tmp_path, task_file, monkeypatch):
    save = training.save_checkpoint

    def dying(directory, model, optimizer, scheduler, meta, **options):
        if meta["step"] == 4:  # killed after logging step 4, before its checkpoint
            raise KeyboardInterrupt
        save(directory, model, optimizer, scheduler, meta, **options)

    recipe = tracked_recipe(task_file, ["tensorboard"], save_every=2)
    monkeypatch.setattr(training, "save_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "run", evaluate=False)
    monkeypatch.setattr(training, "save_checkpoint", save)
    run = train(recipe, tmp_path / "run", resume=True, evaluate=False)
    events = EventAccumulator(str(run / "tb")).Reload()
    history = read_lines(run / "history.jsonl")
    shown = events.Scalars("train/loss")
    assert [e.step for e in shown] == [h["step"] for h in history] == [1, 2, 3, 4]
    assert [e.value for e in shown] == pytest.approx([h["loss"] for h in history], rel=1e-6)


def test_wandb_logs_offline_without_an_account(tmp_path, task_file, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.warns(UserWarning, match="W&B logs offline"):
        run = train(tracked_recipe(task_file, ["wandb"], steps=2), tmp_path / "run", evaluate=False)
    (offline,) = (run / "wandb").glob("offline-run-*")
    run_id = (run / "wandb_id").read_text()
    assert offline.name.endswith(run_id) and list(offline.glob("*.wandb"))


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_tracker_names_its_extra(tmp_path, task_file, monkeypatch, name):
    monkeypatch.setitem(sys.modules, {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[name], None)
    with pytest.raises(ImportError, match=rf"^training.report_to: {name} needs the {name} extra: .*loramix\[{name}\]"):
        train(tracked_recipe(task_file, [name]), tmp_path / "run", evaluate=False)
    assert not (tmp_path / "run").exists()


def test_report_to_names_the_allowed_trackers(task_file):
    with pytest.raises(
        ValueError, match=r"training.report_to='mlflow' is invalid: allowed: \['tensorboard', 'wandb'\]"
    ):
        tracked_recipe(task_file, ["mlflow"])
