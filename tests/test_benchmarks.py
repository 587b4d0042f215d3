"""The benchmark scripts on a tiny model and a tiny JSONL task, so that they cannot rot."""

import json
import shutil
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks folder on sys.path (its scripts import each other as plain modules)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def tiny_settings(task_file) -> list[str]:
    values = {
        "model": "tiny-llama",
        "tasks": "[parity, parity2]",
        "task_files": f"[{task_file}]",
        "max_length": 48,
        "training.batch_size": 2,
        "training.bf16": "false",
        "mixlora.layers_to_transform": "null",  # the recipes adapt SmolLM2's upper 15 layers; tiny-llama has 2
        "lora.layers_to_transform": "null",
        "adapter.layers_to_transform": "null",
    }
    return [item for key, value in values.items() for item in ("--set", f"{key}={value}")]


def test_ranks_are_matched_to_peft(bench, task_file):
    import accuracy

    settings = tiny_settings(task_file)[1::2]
    _, counts = accuracy.match_ranks(list(accuracy.VARIANTS), False, settings)
    peft = counts["lora"].active_experts
    assert {v: c.rank for v, c in counts.items()} == {
        "lora": 8, "soft": 1, "topk": 4, "remix": 4, "task": 1, "prompt": 19, "contrastive": 4,
        "remix-m4": 4, "remix-m8": 4, "pedro": None, "iapt": None, "adalink": None, "alora": None,
    }  # fmt: skip
    for variant, count in counts.items():
        if count.rank is None:  # a method sized by its recipe, for SmolLM2: counted on the tiny model as it is
            assert 0 < count.active <= count.trainable, variant
            continue
        tolerance = 0.05 if variant == "prompt" else 0  # 3 of 7 modules: rank 19 * 3/7 = 8.14
        assert abs(count.active_experts - peft) <= tolerance * peft, variant
        assert count.active >= count.active_experts


def test_accuracy_trains_evaluates_skips_and_resumes(bench, task_file, tmp_path, monkeypatch):
    import accuracy

    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nwritten by hand\n")
    out = tmp_path / "runs"
    argv = [
        *tiny_settings(task_file),
        *("--recipes", "topk,remix,remix-m4", "--seeds", "0,1", "--steps", "2", "--eval-examples", "2"),
        *("--out", str(out), "--results", str(results), "--figures", str(tmp_path / "figures")),
    ]
    section = accuracy.main(argv)
    for variant in ("lora", "topk", "remix", "remix-m4"):
        for seed in (0, 1):
            assert (out / f"{variant}-s{seed}" / "metrics.json").is_file()
    assert "| peft LoRA | 8 |" in section and "| zero-shot (no adapter) |" in section and " ± " in section
    assert "ReMix routing samples M" in section and "Routing imbalance" in section
    assert "Differences from peft LoRA" in section and "| top-k (MixLoRA) | 1 | " in section
    assert "token ESS of the router's distribution" in section and "The same against MixLoRA top-k" in section
    assert {p.name for p in (tmp_path / "figures").iterdir()} >= {
        "accuracy.png", "training_loss.png", "routing_ess.png", "routing_ess_curves.png", "remix_samples.png",
    }  # fmt: skip

    # finished runs are skipped; a run with a checkpoint resumes; one without is started again
    (out / "topk-s1" / "metrics.json").unlink()
    (out / "topk-s1" / "training.json").unlink()
    (out / "remix-s0" / "metrics.json").unlink()
    (out / "remix-s0" / "training.json").unlink()
    for checkpoint in (out / "remix-s0").glob("*checkpoint*"):
        shutil.rmtree(checkpoint)
    calls, real_train = [], accuracy.train

    def spy(recipe, run_dir, resume=False, evaluate=True):
        calls.append((Path(run_dir).name, resume))
        return real_train(recipe, run_dir, resume=resume, evaluate=evaluate)

    monkeypatch.setattr(accuracy, "train", spy)
    accuracy.main(argv)
    assert sorted(calls) == [("remix-s0", False), ("topk-s1", True)]
    text = results.read_text()
    assert text.startswith("# Results\n\nwritten by hand\n") and text.count(accuracy.markers(out.name)[0]) == 1


def test_step_time_is_the_median_interval_of_the_least_loaded_seed(bench):
    import accuracy

    def run(seed, seconds):  # cumulative seconds logged every 2 steps
        return accuracy.Run("topk", seed, history=[{"step": 2 * (i + 1), "seconds": s} for i, s in enumerate(seconds)])

    quiet, loaded = run(0, [2.0, 4.2, 6.2, 20.0]), run(1, [9.0, 18.0, 20.0, 29.0])
    assert quiet.seconds_per_step() == pytest.approx(1.05)  # intervals 1, 1.1, 1, 6.9 per step
    assert accuracy.step_seconds([loaded, quiet]) == pytest.approx(1.05)
    assert accuracy.step_seconds([accuracy.Run("topk", 0)]) is None


def test_remix_samples_ways_agree(bench):
    import remix_samples

    argv = ["--model", "tiny-llama", "--samples", "2,4", "--batch", "2", "--length", "12", "--answer", "4"]
    results = remix_samples.main([*argv, "--steps", "1"])
    assert [r["samples"] for r in results] == [2, 4]
    assert all(r["max_relative_grad_difference"] < 1e-4 for r in results)


def test_train_step_runs_every_variant_in_both_precisions(bench, tmp_path):
    import train_step

    argv = ["--model", "tiny-llama", "--variants", "all", "--autocast", "none,bf16", "--steps", "1"]
    argv += ["--peak-size", "256"]  # bf16 products are emulated, and slow, on some CPUs
    results = train_step.main([*argv, "--batch", "2", "--length", "16", "--json", str(tmp_path / "r.json")])
    assert len(results) == 2 * (1 + len(train_step.ROUTER_VARIANTS))
    assert results[0]["variant"] == "peft" and results[0]["time_vs_peft"] == 1.0
    peft = results[0]["active_params"]
    assert all(abs(r["active_params"] - peft) <= 0.05 * peft for r in results)
    assert all(r["gflop_per_step"] > 0 and r["memory_bytes"] > 0 for r in results)
    assert all(r["operators"] > 0 for r in results) and results[0]["operators_vs_peft"] == 1.0
    by_name = {(r["variant"], r["precision"]): r["operators"] for r in results}
    assert by_name["topk", "float32"] > by_name["peft", "float32"]  # a router and its loss cost operators
    assert json.loads((tmp_path / "r.json").read_text())["results"][1]["variant"] == "soft"


def test_accuracy_runs_in_worker_processes_stops_at_the_time_limit_and_reports_only(
    bench, task_file, tmp_path, monkeypatch, capsys
):
    import accuracy

    out, results = tmp_path / "gpu-runs", tmp_path / "RESULTS.md"
    argv = [
        *tiny_settings(task_file),
        *("--recipes", "topk", "--seeds", "0", "--steps", "2", "--eval-examples", "2"),
        *("--out", str(out), "--results", str(results), "--figures", str(tmp_path / "figures")),
    ]
    accuracy.main([*argv, "--time-limit", "0"])  # over at once: nothing starts
    assert "not started (time limit): lora-s0, topk-s0" in capsys.readouterr().out
    assert not (out / "lora-s0").exists()

    long = [*argv, "--steps", "100000", "--out", str(tmp_path / "long"), "--time-limit", "2"]
    accuracy.main(long)  # a run still going at the limit is stopped, and nothing starts after it
    printed = capsys.readouterr().out
    assert "lora-s0: stopped at the time limit" in printed and "not started (time limit): topk-s0" in printed
    assert not (tmp_path / "long" / "lora-s0" / "metrics.json").exists()

    section = accuracy.main([*argv, "--workers", "2"])
    printed = capsys.readouterr().out
    assert "lora-s0: done" in printed and "topk-s0: done" in printed
    assert "topk-s0: trained and evaluated" in (out / "topk-s0.log").read_text()
    assert "trained on CPU" in section and "| top-k (MixLoRA) | 4 |" in section
    assert json.loads((out / "topk-s0" / "training.json").read_text())["device"].startswith("CPU, ")
    accuracy.main([*argv, "--workers", "2"])  # finished runs start no worker (nor count as a job's duration)
    assert "started" not in capsys.readouterr().out

    # the report alone, as for run folders copied from another machine: nothing is trained
    monkeypatch.setattr(accuracy, "train", lambda *args, **kwargs: pytest.fail("--report-only trained"))
    (out / "topk-s0" / "metrics.json").unlink()
    section = accuracy.main([*argv, "--report-only"])
    assert "| top-k (MixLoRA) | 4 |" in section and "| 0 |" in section  # no finished seed of topk left
    assert results.read_text().count(accuracy.markers("gpu-runs")[0]) == 1


def test_demo_throughput_writes_the_prompts_as_they_were(bench):
    import demo_throughput

    from loramix.data import Example

    prompt = "Patient: itching\n\nWhich diagnosis fits best?"
    example = Example("symptom2disease", prompt, "allergy", ("allergy", "acne"))
    before = demo_throughput.with_listed_labels(example)
    assert before.prompt == "Patient: itching\n\nWhich diagnosis fits best? Answer with one of: allergy, acne."
    assert before.answer == example.answer
    pubmedqa = Example("pubmedqa", "Question?", "yes", ("yes", "no", "maybe"))
    assert demo_throughput.with_listed_labels(pubmedqa) is pubmedqa


def test_settings_reach_only_their_own_adapter_section(bench):
    import accuracy

    settings = ["mixlora.top_k=1", "lora.r=4", "training.steps=3"]
    assert accuracy.for_recipe(settings, accuracy.recipe_path("lora", False)) == ["lora.r=4", "training.steps=3"]
    assert accuracy.for_recipe(settings, accuracy.recipe_path("topk", False)) == ["mixlora.top_k=1", "training.steps=3"]


def test_methods_are_compared_on_the_same_examples_by_a_paired_bootstrap(bench):
    import accuracy

    def run(variant, predictions):
        rows = [
            {"task": "mediqa_rqe", "id": str(i), "prediction": p, "answer": "yes" if i % 2 else "no"}
            for i, p in enumerate(predictions)
        ]
        return accuracy.Run(variant, 0, metrics={"tasks": {}}, predictions=rows)

    answers = ["yes" if i % 2 else "no" for i in range(40)]
    right, wrong = run("topk", answers), run("lora", ["no" if a == "yes" else "yes" for a in answers])
    better = accuracy.paired_difference(right, wrong, "mediqa_rqe")
    assert better["difference"] == 1.0 and better["low"] == 1.0 and better["beats"]
    same = accuracy.paired_difference(right, right, "mediqa_rqe")
    assert same["difference"] == same["low"] == same["high"] == 0.0
    table = accuracy.difference_table({"lora": [wrong], "topk": [right]}, ["mediqa_rqe"])
    assert table[-1] == "| top-k (MixLoRA) | 0 | +1.000 [+1.000, +1.000] ✓ |"


def test_trainer_step_times_the_steps_after_the_first(bench):
    import trainer_step

    assert trainer_step.median_step([10.0, 12.0, 13.0, 16.0]) == 2.0  # step ends: 2, 1, 3 seconds apart
    clock = trainer_step.StepClock()
    clock.on_step_end(None, None, None)
    clock.on_step_end(None, None, None)
    assert len(clock.times) == 2 and clock.times[0] <= clock.times[1]


@pytest.mark.parametrize("router", ["soft", "topk"])
def test_the_operator_floor_computes_the_routers_mixture(bench, router):
    """benchmarks/operators.py's minimal layers are the same mixture as loramix's, so their count is a floor."""
    import operators

    from loramix.models import tiny_llama

    base = tiny_llama().eval()
    minimal, _ = operators.build_variant(f"minimal-{router}", base)
    adapted, _ = operators.build_variant(router, base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in adapted.layers.items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
            floor = minimal.model.get_submodule(name)
            floor.lora_A.copy_(layer.lora_A.flatten(0, 1))
            floor.lora_B.copy_(layer.lora_B.transpose(0, 1).flatten(1))
            floor.gate.weight.copy_(layer.router.gate.weight)
            floor.scale = layer.router.expert_scale
        input_ids = torch.randint(1, 128, (2, 9), generator=generator)
        expected = adapted.eval()(input_ids=input_ids).logits
        assert not torch.allclose(expected, base(input_ids=input_ids).logits, atol=1e-3)  # the experts matter
        torch.testing.assert_close(minimal.model.eval()(input_ids=input_ids).logits, expected)
    counts = operators.main(["--layers", "2", "--variants", f"minimal-{router},{router}"])
    assert counts["peft"] < counts[f"minimal-{router}"] < counts[router]


def test_the_evaluation_floor_counts_a_forward_as_torch_does(bench):
    import eval_floor
    from torch.utils.flop_counter import FlopCounterMode

    from loramix.models import tiny_llama

    model, tokens = tiny_llama().eval(), 12
    model.set_attn_implementation("eager")  # attention as matrix products, which torch counts
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=torch.randint(3, 99, (1, tokens)))
    flops = eval_floor.Flops(model)
    # torch counts attention over every key (causal masking aside): tokens x tokens per layer
    expected = flops.sequence(0, tokens, tokens) - flops.attention * tokens * (tokens + 1) // 2
    assert counter.get_total_flops() == expected + flops.attention * tokens * tokens


def test_harness_speed_times_every_model_on_the_same_requests(bench):
    import harness_speed

    overrides = ["--set", "model=tiny-llama", "--set", "mixlora.layers_to_transform=null"]
    results = harness_speed.run(harness_speed.parse_args(["--questions", "3", "--batch-size", "2", *overrides]))
    assert set(results["ratio_to_hf"]) == {"hf", "mixture", "merged"} and results["ratio_to_hf"]["hf"] == 1
    assert all(len(seconds) == 1 and seconds[0] > 0 for seconds in results["seconds"].values())
    assert all(accuracy in (0, 1 / 3, 2 / 3, 1) for accuracy in results["accuracy"].values())


def test_imbalance_table_reports_every_ess_measure_against_its_ceiling(bench):
    import accuracy

    def record(step, weights, probs, load):
        modules = ("model.layers.3.mlp.up_proj", "model.layers.4.mlp.up_proj")
        return {
            "step": step,
            "seconds": float(step),
            "ess_per_layer": dict(zip(modules, weights, strict=True)),
            "probs_ess_per_layer": dict(zip(modules, probs, strict=True)),
            "load_per_layer": dict(zip(modules, load, strict=True)),
        }

    uniform, one_hot = [0.25] * 4, [1.0, 0.0, 0.0, 0.0]
    topk = accuracy.Run("topk", 0, history=[record(10, (2.0, 2.0), (4.0, 4.0), (uniform, uniform)),
                                            record(20, (1.5, 1.0), (3.0, 1.0), (uniform, one_hot))])  # fmt: skip
    remix = accuracy.Run("remix", 0, history=[record(10, (2.0, 2.0), (3.5, 2.5), (uniform, uniform))])
    table = accuracy.imbalance_table({"topk": [topk], "remix": [remix]})
    # each measure: the mean over modules, (the lowest decoder layer's mean) / its ceiling (k = 2 or n = 4)
    assert "| top-k (MixLoRA) | 10 | 2.00 (2.00) / 2 | 4.00 (4.00) / 4 | 4.00 (4.00) / 4 |" in table
    assert "| top-k (MixLoRA) | 20 | 1.25 (1.00) / 2 | 2.00 (1.00) / 4 | 2.50 (1.00) / 4 |" in table
    assert "| ReMix, M=2 | 10 | 2.00 (2.00) / 2 | 3.00 (2.50) / 4 | 4.00 (4.00) / 4 |" in table


def test_remix_router_gradient_is_noisy_where_top_k_is_exact(bench, tiny_batch):
    """remix_gradients.measure: a learned top-k router's gradient is deterministic (infinite signal-to-noise,
    repeats agree), ReMix's RLOO gradient changes with every routing sample; both routers get one."""
    import remix_gradients

    from loramix import MixLoraConfig, wrap
    from loramix.models import tiny_llama

    rows = {}
    for router in ("topk", "remix"):
        config = MixLoraConfig("all-linear", router=router, num_experts=4, expert_rank=2, top_k=2, remix_samples=4)
        model = wrap(tiny_llama(), config)
        with torch.no_grad():  # B starts at zero: no expert changes the loss, so no route gets a reward
            for layer in model.layers.values():
                layer.lora_B.normal_(std=0.5)
        torch.manual_seed(0)
        rows[router] = remix_gradients.measure(model, [tiny_batch], repeats=4, max_grad_norm=1.0)
    assert rows["topk"]["snr"] == float("inf") and rows["topk"]["cosine"] == pytest.approx(1.0)
    assert rows["remix"]["router_norm"] > 0 and rows["remix"]["cosine"] < 0.99 and rows["remix"]["snr"] < 1e3
    for row in rows.values():
        assert row["expert_norm"] > 0 and 0 < row["clip"] <= 1.0


THREE = ["parity", "parity2", "parity3"]


def test_continual_learning_runs_end_to_end_and_skips_what_it_did(bench, task_file, tmp_path):
    import continual

    third = tmp_path / "parity3.jsonl"
    rows = [{"task": "parity3", "prompt": f"{n}?", "answer": "odd" if n % 2 else "even"} for n in range(40)]
    third.write_text("\n".join(json.dumps(row | {"choices": ["even", "odd"]}) for row in rows))
    values = [f"task_files=[{task_file},{third}]", "model=tiny-llama", "max_length=48", "training.batch_size=2"]
    values += ["training.bf16=false", "mixlora.layers_to_transform=null", "lora.layers_to_transform=null"]
    settings = [item for value in values for item in ("--set", value)]
    out = tmp_path / "continual"
    argv = ["--quick", "--tasks", "parity,parity2,parity3", "--single", "parity3", "--new-experts", "2"]
    argv += ["--out", str(out), "--results", str(tmp_path / "RESULTS.md"), "--figures", str(tmp_path / "figures")]
    section = continual.main([*argv, *settings])

    assert (tmp_path / "figures" / "continual.png").is_file() and section in (tmp_path / "RESULTS.md").read_text()
    new_experts = [json.loads((out / name / "scores.json").read_text()) for name in ("first/1-parity",)]
    new_experts += [json.loads((out / f"new-experts/{i}-parity{i}/scores.json").read_text()) for i in (2, 3)]
    assert [sorted(stage["tasks"]) for stage in new_experts] == [["parity"], ["parity", "parity2"], THREE]
    last = new_experts[-1]["tasks"]
    assert last["parity"]["reused"] and last["parity2"]["reused"] and not last["parity3"]["reused"]
    assert last["parity"]["rows"] == new_experts[0]["tasks"]["parity"]["rows"]
    growth = [stage["parameters"] for stage in new_experts]
    assert growth[0] < growth[1] < growth[2]  # each added task brings its experts
    summary = {}  # each variant's first row: the summary table's (the single-task comparison repeats the label)
    for line in section.splitlines():
        if line.startswith("| ("):
            summary.setdefault(line.split(" | ")[0], line)
    assert " | +0.000 | — | " in summary["| (c) new experts"]  # BWT exactly 0, no FWT for a task router
    assert " | +0.000 | — | " in summary["| (c') new experts used alone"]
    assert "| parity3: R[j][j] − single [95% CI] |" in section

    stamps = {path: path.stat().st_mtime for path in out.rglob("scores.json")}
    continual.main([*argv, *settings])  # everything was done: nothing is trained or scored again
    assert {path: path.stat().st_mtime for path in out.rglob("scores.json")} == stamps
