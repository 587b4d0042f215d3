"""The run report: plots from a synthetic run folder, report.md and the score table."""

import json

import pytest
from rich.console import Console

from loramix.report import score_rows, summary_table, write_report

MODULES = [f"model.layers.{layer}.self_attn.{kind}" for layer in range(2) for kind in ("q_proj", "v_proj")]
METRICS = {
    "tasks": {
        "pubmedqa": {
            "model": {"accuracy": 0.6, "macro_f1": 0.5},
            "zero_shot": {"accuracy": 0.4, "macro_f1": 0.3},
            "majority": {"accuracy": 0.55, "macro_f1": 0.24},
            "intervals": {"model": {"accuracy": [0.5, 0.7]}, "zero_shot": {"accuracy": [0.3, 0.5]}},
            "differences": {
                "zero_shot": {"metric": "accuracy", "difference": 0.2, "low": 0.08, "high": 0.31, "beats": True},
                "majority": {"metric": "accuracy", "difference": 0.05, "low": -0.04, "high": 0.14, "beats": False},
            },
            "n": 100,
        },
        "medqa_usmle": {"model": None, "zero_shot": {"accuracy": 0.2}, "majority": {"accuracy": 0.3}, "n": 50},
    },
    "meta": {"model": "tiny", "parameters": {"trainable": 1234, "active_per_token": 567}},
}


def write_run(run, routing: bool = True, modules: list[str] = MODULES) -> None:
    (run / "adapter").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: demo\nmodel: tiny\ntasks: [pubmedqa]\nevaluation: [medqa_usmle]\n")
    config = {"target_modules": "all-linear", "router": "topk", "top_k": 2, "num_experts": 4, "expert_rank": 2}
    (run / "adapter" / "loramix_config.json").write_text(json.dumps(config))
    with open(run / "history.jsonl", "w") as history:
        for step in range(1, 31):
            ess = {m: 2.0 - step / 30 - 0.1 * i for i, m in enumerate(modules)}
            record = {
                "step": step,
                "loss": 3.0 / step + 0.5,
                "ce": 3.0 / step + 0.45,
                "aux": {"balance": 1.0 + 0.5 / step},
                "ess": sum(ess.values()) / len(ess),
                "ess_per_layer": ess,
                "lr": 1e-4,
                "seconds": 2.0 * step,
            }
            history.write(json.dumps(record) + "\n")
    (run / "metrics.json").write_text(json.dumps(METRICS))
    summary = {"steps": 30, "seconds": 60.0, "world_size": 1, "max_length": 256}
    (run / "training.json").write_text(
        json.dumps(summary | {"encoded": {"pubmedqa": 240}, "truncated": {"pubmedqa": 12}})
    )
    if routing:
        loads = {m: {"load": [0.7 - 0.1 * i, 0.2, 0.1 + 0.1 * i, 0.0], "ess": 1.5} for i, m in enumerate(modules)}
        (run / "routing.json").write_text(json.dumps(loads))


def test_score_rows_and_average():
    rows = score_rows(METRICS)
    assert [(task, metric) for task, metric, _ in rows] == [
        ("pubmedqa", "accuracy"),
        ("pubmedqa", "macro_f1"),
        ("medqa_usmle", "accuracy"),
        ("average", "main metric, 1 of 2 tasks"),
    ]
    assert rows[-1][2] == pytest.approx({"model": 0.6, "zero_shot": 0.4, "majority": 0.55})  # medqa: no model score
    scored = {**METRICS["tasks"]["medqa_usmle"], "model": {"accuracy": 0.3}}
    rows = score_rows({"tasks": {**METRICS["tasks"], "medqa_usmle": scored}})
    assert rows[-1] == ("average", "main metric", pytest.approx({"model": 0.45, "zero_shot": 0.3, "majority": 0.425}))


def test_write_report_makes_plots_and_a_table(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    report = write_report(run)
    for name in ("loss.png", "expert_load.png", "ess.png", "scores.png"):
        data = (run / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    text = report.read_text()
    pubmedqa = "| pubmedqa | accuracy | 0.600 [0.500, 0.700] | 0.400 [0.300, 0.500] | 0.550 |"
    assert f"{pubmedqa} +0.200 [+0.080, +0.310] ✓ | +0.050 [-0.040, +0.140] ✗ | 100 |" in text
    assert "| pubmedqa | macro_f1 | 0.500 | 0.300 | 0.240 |  |  | 100 |" in text  # differences: main metric only
    assert "| medqa_usmle | accuracy | — | 0.200 | 0.300 |  |  | 50 |" in text
    assert "**average**" in text
    assert "trainable: 1,234" in text
    assert "inputs truncated to 256 tokens: pubmedqa 12/240" in text
    for name in ("loss.png", "expert_load.png", "ess.png", "scores.png"):
        assert f"]({name})" in text


def test_write_report_shows_the_learning_curve(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    assert "Learning curve" not in write_report(run).read_text() and not (run / "learning_curve.png").exists()
    with open(run / "learning_curve.jsonl", "w") as curve:
        for step in range(0, 301, 20):
            tasks = {"pubmedqa": {"accuracy": 0.3 + step / 1000, "macro_f1": 0.2}, "ncbi_disease": {"f1": step / 600}}
            curve.write(json.dumps({"step": step, "seconds": step / 2, "dev_seconds": 1.5, "tasks": tasks}) + "\n")
    text = write_report(run).read_text()
    data = (run / "learning_curve.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    section = text[text.index("## Learning curve") : text.index("## Test scores")]
    assert "| step | pubmedqa (accuracy) | ncbi_disease (f1) |" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 12 and rows[0] == "| 0 | 0.300 | 0.000 |" and rows[-1] == "| 300 | 0.600 | 0.500 |"
    assert "![Learning curve](learning_curve.png)" in section


def test_report_without_routing_statistics(tmp_path):
    run = tmp_path / "run"
    write_run(run, routing=False)
    text = write_report(run).read_text()
    assert not (run / "expert_load.png").exists()
    assert "routing.json is missing" in text


def test_many_modules_are_grouped_by_layer_and_kind(tmp_path):
    run = tmp_path / "run"
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj")
    write_run(run, modules=[f"model.layers.{layer}.self_attn.{k}" for layer in range(12) for k in kinds])
    write_report(run)
    assert (run / "expert_load.png").stat().st_size > 5000


def test_summary_table_lists_every_task(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    console = Console(record=True, width=150)
    console.print(summary_table(run))
    text = console.export_text()
    for expected in ("pubmedqa", "macro_f1", "medqa_usmle", "average", "0.600", "[0.500, 0.700]", "1 of 2 tasks"):
        assert expected in text


def test_summary_table_without_metrics_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="loramix eval"):
        summary_table(tmp_path)


def test_an_alora_run_plots_the_ranks_it_allocated(tmp_path):
    import loramix
    from loramix.methods.alora import AloraConfig
    from loramix.models import tiny_llama
    from loramix.report import read_rank_allocation

    model = loramix.wrap(tiny_llama(), AloraConfig(rank=2, max_rank=4, allocation_rounds=0))
    q, v = model.layers["model.layers.0.self_attn.q_proj"], model.layers["model.layers.1.self_attn.v_proj"]
    q.rank_gates[2:] = 1  # grown to 4
    v.rank_gates[1:] = 0  # pruned to 1
    model.save_pretrained(tmp_path / "adapter")
    ranks = read_rank_allocation(tmp_path)
    assert set(ranks) == set(model.layers) and ranks == model.ranks_per_module()
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 and ranks["model.layers.1.self_attn.v_proj"] == 1
    report = write_report(tmp_path).read_text()
    assert "![Ranks per module](ranks.png)" in report and (tmp_path / "ranks.png").stat().st_size > 0
    assert "No expert-load plot" not in report  # ALoRA has no router to miss
