"""ALoRA (loramix.methods.alora): the gated layer, ablation importance against masking by hand, allocation
rounds, saving and resuming the allocation."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train import tiny_recipe

import loramix
import loramix.methods.alora as alora
from loramix.data.sampling import TaskSampler
from loramix.methods.alora import AloraConfig, held_out_examples
from loramix.models import tiny_gpt2, tiny_llama
from loramix.train import train


def batches() -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches (3 and 2 rows) with answer-only labels and task ids."""
    generator = torch.Generator().manual_seed(0)
    made = []
    for lengths in ((10, 7, 5), (8, 6)):
        input_ids = torch.randint(1, 128, (len(lengths), max(lengths)), generator=generator)
        attention_mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :3] = -100
        task_ids = torch.arange(len(lengths)) % 2
        made.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids})
    return made


def adapted(builder=tiny_llama, **settings) -> alora.AloraModel:
    """A tiny model with rank-2 (of 4) ALoRA modules whose B are random (a fresh B is 0)."""
    config = AloraConfig(**({"rank": 2, "max_rank": 4, "allocation_rounds": 2, "prune_per_round": 3} | settings))
    model = loramix.wrap(builder().eval(), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    return model


def reference_loss(model: alora.AloraModel, data: list[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy over every labelled token of the batches, from the full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            scored = labels != -100
            total += F.cross_entropy(logits[:, :-1][scored], labels[scored], reduction="sum").item()
            count += int(scored.sum())
    return total / count


def test_the_gated_layer_is_w0_x_plus_s_b_diag_g_a_x():
    model = adapted(target_modules=["q_proj"], alpha=6.0)
    layer = next(iter(model.layers.values()))
    layer.rank_gates.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    W0, A, B = layer.base_layer.weight, layer.lora_A, layer.lora_B
    expected = x @ W0.T + (6.0 / 2) * x @ A.T @ torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0])) @ B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        layer.row_gates = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # one gate vector per row
        rows = layer(x)
    for row, gates in enumerate(layer.row_gates):
        own = x[row] @ W0.T + 3.0 * x[row] @ A.T @ torch.diag(gates) @ B.T
        torch.testing.assert_close(rows[row], own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("builder", "layers", "one_row"),
    [(tiny_llama, None, False), (tiny_llama, [1], False), (tiny_llama, [1], True), (tiny_gpt2, None, False)],
)
def test_an_importance_score_is_the_loss_change_of_masking_that_rank(monkeypatch, builder, layers, one_row):
    monkeypatch.setattr(alora, "ABLATION_ROWS", 7)  # 2 or 3 replicas a forward: chunks cross modules and blocks
    model = adapted(builder, layers_to_transform=layers)
    next(iter(model.layers.values())).rank_gates[1] = 0  # an inactive slot is not scored
    model.train()
    data = held_out_examples(batches(), 4, 0) if one_row else batches()  # batches of one row each
    scores = model.rank_importance(data)
    assert model.training and all(layer.row_gates is None for layer in model.layers.values())
    model.eval()
    full = reference_loss(model, data)
    for module, layer in enumerate(model.layers.values()):
        for slot in range(4):
            if not layer.rank_gates[slot]:
                assert torch.isnan(scores[module, slot])
                continue
            layer.rank_gates[slot] = 0
            masked = reference_loss(model, data)
            layer.rank_gates[slot] = 1
            assert scores[module, slot].item() == pytest.approx(masked - full, abs=2e-6)
    assert scores.nan_to_num().abs().max() > 1e-3  # the ranks matter: the comparison is not of zeros


def test_held_out_examples_alternate_tasks_without_padding():
    picked = held_out_examples(batches(), 3, 1)
    # by (example of its task, task): lengths 10 (task 0), 7 (task 1), 5 (task 0), 6 (task 1), 8 (task 0)
    assert [e["input_ids"].shape[1] for e in picked] == [7, 5, 6]
    assert [int(e["task_ids"]) for e in picked] == [1, 0, 1]
    assert all(e["attention_mask"].all() for e in picked)


def adam_after_one_step(model: alora.AloraModel) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model.compute_loss(batches()[0]).backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def test_an_allocation_round_moves_the_lowest_ranks_to_the_best_modules():
    model = adapted()  # 14 modules, 2 of 4 slots active in each
    optimizer = adam_after_one_step(model)
    model.eval()
    names = list(model.layers)
    scores = torch.full((14, 4), float("nan"))
    scores[:, :2] = torch.arange(28, dtype=torch.float).view(14, 2) / 100 + 0.5
    scores[5, 0], scores[9, 1], scores[12, 0] = -0.3, -0.2, 0.01  # the three lowest
    scores[3], scores[7] = torch.tensor([0.9, 0.95, 0, 0]), torch.tensor([0.8, 0.99, 0, 0])  # the best means
    data = batches()[0]
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    layers = list(model.layers.values())
    with torch.no_grad():  # the outputs once the three ranks are pruned
        for module, slot in ((5, 0), (9, 1), (12, 0)):
            layers[module].rank_gates[slot] = 0
        pruned_only = model(**inputs).logits
        for module, slot in ((5, 0), (9, 1), (12, 0)):
            layers[module].rank_gates[slot] = 1
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}

    record = model.allocate(scores, optimizer, step=10)

    assert record == {
        "step": 10,
        "pruned": [[names[5], 0], [names[9], 1], [names[12], 0]],
        "grown": [[names[3], 2], [names[7], 2], [names[13], 2]],  # 13: the next best mean (0.765)
    }
    assert model.allocation_history() == [record]
    ranks = model.ranks_per_module()
    assert sum(ranks.values()) == 28
    assert [ranks[names[m]] for m in (3, 7, 13, 5, 9, 12, 0)] == [3, 3, 3, 1, 1, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, pruned_only, rtol=0, atol=1e-6)
    for module, slot in ((3, 2), (7, 2), (13, 2), (5, 0), (9, 1), (12, 0)):
        layer = layers[module]
        for parameter, index in ((layer.lora_A, (slot,)), (layer.lora_B, (slice(None), slot))):
            moments = optimizer.state[parameter]
            assert not moments["exp_avg"][index].any() and not moments["exp_avg_sq"][index].any()
            before = state[id(parameter)]["exp_avg_sq"].clone()
            before[index] = 0
            assert torch.equal(moments["exp_avg_sq"], before)  # the other slots' state is kept
    grown = layers[3]
    assert not grown.lora_B[:, 2].any() and grown.lora_A[2].abs().max() <= 32**-0.5 and grown.lora_A[2].any()


def test_a_module_keeps_one_rank_and_a_round_prunes_what_it_may():
    model = adapted(prune_per_round=20)  # more than the 14 ranks above the floor
    scores = torch.full((14, 4), float("nan"))
    scores[:, :2] = torch.randn(14, 2, generator=torch.Generator().manual_seed(3))
    record = model.allocate(scores)
    assert len(record["pruned"]) == len(record["grown"]) == 14
    assert sum(model.ranks_per_module().values()) == 28 and min(model.ranks_per_module().values()) >= 1
    kept = {name: [int(s) for s in layer.rank_gates.nonzero()[:, 0] if s < 2] for name, layer in model.layers.items()}
    for module, name in enumerate(model.layers):  # each module's better rank stayed
        assert kept[name] == [int(scores[module, :2].argmax())]
    model.allocate(scores)
    with pytest.raises(ValueError, match="all 2 allocation rounds"):
        model.allocate(scores)


def test_save_and_load_restore_the_allocation(tmp_path):
    model = adapted()
    model.allocate(model.rank_importance(batches()), step=4)
    data = batches()[1]
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = loramix.load(tiny_llama().eval(), tmp_path)
    assert loaded.ranks_per_module() == model.ranks_per_module() != dict.fromkeys(model.layers, 2)
    assert loaded.allocation_history() == model.allocation_history()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    counts = loaded.count_parameters()
    per_rank = {name: layer.in_features + layer.out_features for name, layer in loaded.layers.items()}
    assert counts["trainable"] == 4 * sum(per_rank.values())
    assert counts["active_per_token"] == sum(per_rank[n] * r for n, r in loaded.ranks_per_module().items())


def test_the_config_names_its_bad_settings():
    with pytest.raises(ValueError, match=r"AloraConfig.max_rank=4 is invalid: expected an integer >= rank=8"):
        AloraConfig(rank=8, max_rank=4)
    with pytest.raises(ValueError, match=r"max_rank=8 is invalid: expected > rank=8"):
        AloraConfig(rank=8, max_rank=8)
    AloraConfig(rank=8, max_rank=8, allocation_rounds=0)
    with pytest.raises(ValueError, match=r"prune_per_round=0 is invalid: expected an integer >= 1"):
        AloraConfig(prune_per_round=0)
    method, details = AloraConfig().card_details()
    assert method == ("ALoRA, allocating low-rank adaptation (AB-LoRA)", "arXiv 2403.16187")
    assert details["rank allocation"] == "3 rounds, one every 100 steps, moving 8 ranks each"


class Killed(Exception):
    """Stands for the process being killed."""


def test_a_run_allocates_ranks_and_resumes_to_the_same_allocation(tmp_path, task_file, monkeypatch):
    settings = {"rank": 2, "max_rank": 4, "allocate_every": 2, "allocation_rounds": 2, "prune_per_round": 2}
    recipe = tiny_recipe(task_file, "alora", dev_examples=4, method_settings=settings)
    straight = train(recipe, tmp_path / "straight", evaluate=False)
    draw, calls = TaskSampler.draw, []

    def killed_during_step_5(self, count):
        calls.append(count)
        if len(calls) == 5:  # after the checkpoint of step 3, which holds the round of step 2
            raise Killed
        return draw(self, count)

    monkeypatch.setattr(TaskSampler, "draw", killed_during_step_5)
    with pytest.raises(Killed):
        train(recipe, tmp_path / "resumed", evaluate=False)
    monkeypatch.setattr(TaskSampler, "draw", draw)
    resumed = train(recipe, tmp_path / "resumed", resume=True, evaluate=False)

    expected, got = (load_file(run / "adapter" / "adapter.safetensors") for run in (straight, resumed))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    loaded = loramix.load(tiny_llama(), straight / "adapter")
    assert [entry["step"] for entry in loaded.allocation_history()] == [2, 4]
    assert loaded.ranks_per_module() != dict.fromkeys(loaded.layers, 2)
    assert sum(loaded.ranks_per_module().values()) == 2 * len(loaded.layers)
