"""transformers.Trainer and TRL's SFTTrainer driving a MixLoraModel: the loss, the steps, checkpoints, resuming."""

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

import loramix
from loramix import MixLoraConfig
from loramix.models import tiny_llama, tiny_tokenizer
from loramix.trainer import MixLoraTrainer, RoutingStatsCallback, TaskCollator, sft_trainer_class

LR = 1e-2


def rows(count: int = 4) -> list[dict]:
    """Encoded rows of random ids (lengths 6 to 12), the first 3 tokens unscored, task ids 0 and 1."""
    generator = torch.Generator().manual_seed(0)
    result = []
    for number in range(count):
        ids = torch.randint(3, 128, (6 + 2 * number % 7,), generator=generator).tolist()
        result.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "task_ids": number % 2})
    return result


def wrapped_model(router: str = "topk") -> loramix.MixLoraModel:
    config = MixLoraConfig("all-linear", router=router, num_experts=4, expert_rank=2, top_k=2, num_tasks=2)
    torch.manual_seed(0)
    return loramix.wrap(tiny_llama(), config)


def arguments(tmp_path, steps: int, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,  # the whole data set: every step sees the same batch
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def trainable(model: loramix.MixLoraModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def collator() -> TaskCollator:
    return TaskCollator(tiny_tokenizer().pad_token_id)


@pytest.mark.parametrize("router", ["topk", "remix", "task"])
def test_forward_with_labels_returns_the_training_loss(router):
    batch = collator()(rows())
    model = wrapped_model(router).train()
    torch.manual_seed(1)
    expected = model.compute_loss(batch)
    torch.manual_seed(1)  # ReMix samples its routes: the same draws
    output = model(**batch)
    assert torch.equal(output.loss, expected)
    output.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="prompt_mask"):
        model(**batch, prompt_mask=batch["attention_mask"].bool())


def test_collator_pads_rows_and_stacks_task_ids():
    batch = collator()(rows(3))
    assert batch["input_ids"].shape == (3, 10)
    assert batch["task_ids"].tolist() == [0, 1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [6, 8, 10]
    assert (batch["labels"][:, :3] == -100).all()
    with pytest.raises(ValueError, match="row 0 .*no input_ids"):
        collator()([{"labels": [1]}])


def test_trainer_steps_equal_compute_loss_steps(tmp_path):
    """A stock Trainer (AdamW, constant lr, clipping) moves the parameters as loramix's loss does by hand."""
    model = wrapped_model()
    trainer = Trainer(model=model, args=arguments(tmp_path, 3), train_dataset=rows(), data_collator=collator())
    result = trainer.train()
    by_hand = wrapped_model().train()
    parameters = [p for p in by_hand.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.0)
    batch = collator()(rows())
    losses = []
    for _ in range(3):
        loss = by_hand.compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    for name, value in trainable(by_hand).items():
        assert torch.allclose(trainable(model)[name], value, atol=1e-5), name
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, abs=1e-4)  # Trainer logs 4 decimals
    assert losses[-1] < losses[0] and result.global_step == 3


def test_checkpoints_hold_the_loramix_adapter_and_load(tmp_path):
    model = wrapped_model("remix")
    args = arguments(tmp_path, 4, save_strategy="steps", save_steps=2)
    trainer = MixLoraTrainer(model=model, args=args, train_dataset=rows(), data_collator=collator())
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "loramix_config.json").is_file() and (checkpoint / "adapter.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    batch = collator()(rows())
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "task_ids")}
    loaded = loramix.load(tiny_llama(), checkpoint).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["routing/ess"] == pytest.approx(2.0) for entry in logged)  # ReMix: k constant weights
    assert all(0 < entry["routing/load_ess"] <= 4 and "loss/rloo" in entry for entry in logged)


def test_resuming_a_trainer_run_continues_it_exactly(tmp_path):
    whole = wrapped_model()
    MixLoraTrainer(
        model=whole, args=arguments(tmp_path / "whole", 4), train_dataset=rows(), data_collator=collator()
    ).train()
    first = wrapped_model()
    args = arguments(tmp_path / "parts", 2, save_strategy="steps", save_steps=2)
    MixLoraTrainer(model=first, args=args, train_dataset=rows(), data_collator=collator()).train()
    resumed = wrapped_model()  # a fresh model: its adapter comes from the checkpoint
    args = arguments(tmp_path / "parts", 4, save_strategy="steps", save_steps=2)
    trainer = MixLoraTrainer(model=resumed, args=args, train_dataset=rows(), data_collator=collator())
    trainer.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))
    for name, value in trainable(whole).items():
        assert torch.allclose(trainable(resumed)[name], value, atol=1e-6), name


def test_gradient_checkpointing_is_refused_clearly(tmp_path):
    args = arguments(tmp_path, 1, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient checkpointing is not supported.*gradient_checkpointing=False"):
        Trainer(model=wrapped_model(), args=args, train_dataset=rows(), data_collator=collator()).train()


def test_routing_stats_callback_works_with_a_stock_trainer(tmp_path):
    model = wrapped_model()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, 2),
        train_dataset=rows(),
        data_collator=collator(),
        callbacks=[RoutingStatsCallback()],
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    assert all(entry["routing/ess"] <= 2.0 and "loss/ce" in entry and "loss/balance" in entry for entry in logged)


def test_sft_trainer_trains_and_checkpoints_the_adapter(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig

    model = wrapped_model()
    before = trainable(model)
    values = arguments(tmp_path, 3).to_dict()
    config = SFTConfig(
        **{key: values[key] for key in ("output_dir", "max_steps", "learning_rate", "report_to", "use_cpu", "seed")},
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        gradient_checkpointing=False,
    )
    trainer = sft_trainer_class()(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows()),
        data_collator=collator(),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(value, trainable(model)[name]) for name, value in before.items())
    loaded = loramix.load(tiny_llama(), tmp_path / "checkpoint-3")
    for name, value in trainable(model).items():
        assert torch.equal(trainable(loaded)[name], value), name


def test_the_wrapper_answers_for_its_base_model_as_tools_expect():
    model = wrapped_model()
    assert model.config is model.base_model.config and model.config.model_type == "llama"
    assert model.mixlora_config.router == "topk"
    assert model.get_input_embeddings() is model.base_model.get_input_embeddings()  # from the base model
    with pytest.raises(AttributeError):
        model.no_such_attribute  # noqa: B018
    copied = copy.deepcopy(model).eval()
    assert isinstance(copied, loramix.MixLoraModel) and copied.base_model is not model.base_model
    batch = collator()(rows())
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(copied(**inputs).logits, model.eval()(**inputs).logits)
