"""Users' data in a recipe's `data:` entries: chat conversations (labels checked token by token), Alpaca rows,
parquet and saved datasets through `datasets`, malformed rows, and training and evaluating on them."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loramix.data import TASKS, Example, encode_example
from loramix.data.sampling import Encoder
from loramix.data.sources import load_data_tasks
from loramix.evaluate import answer_perplexity
from loramix.models import load_model, tiny_tokenizer
from loramix.recipe import DataEntry, Recipe
from loramix.train import train


@pytest.fixture(autouse=True)
def one_thread_and_own_registry():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registered = dict(TASKS)
    yield
    torch.set_num_threads(threads)
    TASKS.clear()
    TASKS.update(registered)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def conversation(n: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": f"Hi {n}"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": f"See you {n}."},
        ]
    }


def labelled_pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """input_ids and labels of hand-written (text, labelled) pieces, one token a character."""
    ids, labels = [], []
    for text, labelled in pieces:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += tokens
        labels += tokens if labelled else [-100] * len(tokens)
    return ids, labels


# ---- chat -----------------------------------------------------------------------------------------------------
def test_a_chat_row_trains_on_every_assistant_turn_and_its_own_system_turn(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(n) for n in range(10)])
    tasks = load_data_tasks([DataEntry(str(path), "chat", "support")], register=False)
    (example,) = [e for e, _ in tasks["support"].rows if e.id == "chat.jsonl:1"]  # conversation 0
    assert (example.prompt, example.answer) == ("Bye", "See you 0.")
    tokenizer = tiny_tokenizer()
    head = "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi 0<|im_end|>\n<|im_start|>assistant\n"
    middle = "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    pieces = [(head, False), ("Hello!<|im_end|>", True), (middle, False), ("See you 0.<|im_end|>", True)]
    ids, labels = labelled_pieces(tokenizer, pieces)
    encoder = Encoder(tokenizer, 200, [[example]], system_prompt="The recipe's prompt.")  # replaced by the row's
    batch = encoder.batch([(0, 0)])
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels
    assert encoder.counts["dropped_turns"] == {"support": 0}

    last = load_data_tasks([DataEntry(str(path), "chat", "support", train_on="last")], register=False)["support"]
    row = encode_example(last.rows[0][0], tokenizer, 200)
    assert row["input_ids"] == ids
    assert row["labels"] == [-100] * (len(ids) - len("See you 0.") - 1) + labels[-len("See you 0.") - 1 :]

    prompt = encode_example(example, tokenizer, 200, with_answer=False)  # evaluation: the turns before the answer
    assert tokenizer.decode(prompt["input_ids"]) == head + "Hello!<|im_end|>" + middle


def test_a_long_conversation_loses_its_earliest_turns_first(tmp_path):
    tokenizer = tiny_tokenizer()
    example = Example(
        "t",
        "Q3",
        "A3",
        context=(("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")),
    )
    whole = encode_example(example, tokenizer, 500)
    assert not whole["truncated"] and whole["dropped_turns"] == 0
    exchange = "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
    turn = len(tokenizer(exchange, add_special_tokens=False)["input_ids"])
    cut = encode_example(example, tokenizer, len(whole["input_ids"]) - 1)
    assert cut["truncated"] and cut["dropped_turns"] == 2 and len(cut["input_ids"]) == len(whole["input_ids"]) - turn
    assert tokenizer.decode(cut["input_ids"]).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ2")
    assert tokenizer.decode([t for t, label in zip(cut["input_ids"], cut["labels"], strict=True) if label != -100]) == (
        "A2<|im_end|>A3<|im_end|>"
    )
    alone = encode_example(example, tokenizer, 40)  # no earlier turn fits: the prompt loses its start as before
    assert alone["dropped_turns"] == 4 and alone["truncated"] and len(alone["input_ids"]) <= 40
    assert tokenizer.decode(alone["input_ids"]).endswith("3<|im_end|>\n<|im_start|>assistant\nA3<|im_end|>")


# ---- alpaca, parquet, saved datasets --------------------------------------------------------------------------
def test_alpaca_rows_from_jsonl_and_from_a_json_array_through_datasets(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue", "system": "Answer in one word."},
    ]
    lines = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(rows))
    for path in (lines, array):
        task = load_data_tasks([DataEntry(str(path), "alpaca", "maths", use_as="train")], register=False)["maths"]
        first, second = (example for example, _ in task.rows)
        assert (first.prompt, first.answer, first.context) == ("Add the numbers.\n\n2 and 3", "5", ())
        assert (second.prompt, second.context) == ("Name a colour.", (("system", "Answer in one word."),))
        assert {split for _, split in task.rows} == {"train"} and not task.choices
    assert [e.id for e, _ in task.rows] == ["alpaca.json:0", "alpaca.json:1"]  # a dataset's rows by index


def test_a_parquet_file_through_datasets_with_a_column_mapping(tmp_path):
    path = tmp_path / "qa.parquet"
    table = {
        "question": [f"Is {n} even?" for n in range(10)],
        "label": [n % 2 for n in range(10)],  # numbers become text
        "options": [["0", "1"]] * 10,
        "part": ["test" if n < 2 else "train" for n in range(10)],
    }
    pq.write_table(pa.table(table), path)
    entry = DataEntry(
        str(path), "columns", "even", {"prompt": "question", "answer": "label", "choices": "options", "split": "part"}
    )
    task = load_data_tasks([entry], register=False)["even"]
    splits = task.load()
    assert [e.prompt for e in splits["test"]] == ["Is 0 even?", "Is 1 even?"] and len(splits["train"]) == 8
    assert splits["test"][1].answer == "1" and task.choices == ("0", "1") and task.metrics == ("accuracy",)

    missing = DataEntry(str(path), "columns", "even", {"prompt": "query"})
    with pytest.raises(ValueError, match=r"qa\.parquet: no column 'query' .*its columns: \['question', 'label'"):
        load_data_tasks([missing], register=False)


def test_a_dataset_saved_to_disk_by_its_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["a?", "b?", "c?"], "answer": ["A", "B", "C"]}
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)})
    saved.save_to_disk(str(tmp_path / "saved"))
    entry = DataEntry(str(tmp_path / "saved"), "columns", "letters", split="test", use_as="test")
    task = load_data_tasks([entry], register=False)["letters"]
    assert [e.answer for e in task.load()["test"]] == ["A", "B", "C"] and not task.trainable
    with pytest.raises(ValueError, match=r"saved has no split 'dev'; its splits: train, test"):
        load_data_tasks([DataEntry(str(tmp_path / "saved"), "columns", "letters", split="dev")], register=False)


# ---- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("row", "error"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, r":2: the last message must be the assistant's"),
        (
            {"messages": [{"role": "assistant", "content": "Hi"}]},
            r":2: message 0 has role 'assistant', expected 'user'",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hey"}]},
            r":2: message 1 has role 'user', expected 'assistant'",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, r":2: message 0 \(user\) must have non-empty text"),
        ({"messages": [{"role": "user", "content": "Hi", "weight": 0}]}, r":2: message 0 must be an object of"),
        ({"messages": "Hi"}, r":2: 'messages' must be a non-empty list"),
        ({"conversation": []}, r":2: 'messages' must be a non-empty list of messages, got None"),
    ],
)
def test_a_malformed_chat_row_names_its_file_and_line(tmp_path, row, error):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(0), row])
    with pytest.raises(ValueError, match=r"chat\.jsonl" + error):
        load_data_tasks([DataEntry(str(path), "chat", "support")], register=False)


def test_a_malformed_dataset_row_names_its_index(tmp_path):
    path = tmp_path / "alpaca.csv"
    path.write_text('instruction,input,output\nSay hi.,,hi\n"Say bye.",,\n')
    with pytest.raises(ValueError, match=r"alpaca\.csv \[train\] row 1: field 'output' must be a non-empty string"):
        load_data_tasks([DataEntry(str(path), "alpaca", "greet")], register=False)


def tiny_data_recipe(data: list[dict], **values) -> Recipe:
    training = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "save_every": 2, "lr": 1e-2}
    mixlora = {"target_modules": ["q_proj", "v_proj"], "router": "topk", "num_experts": 4, "expert_rank": 2}
    tasks = list(dict.fromkeys(entry.get("task", "parity") for entry in data))
    settings = {"name": "tiny", "model": "tiny-llama", "tasks": tasks, "data": data, "max_length": 96}
    return Recipe(**settings | {"eval_examples": 2, "training": training, "mixlora": mixlora} | values)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"format": "sharegpt"}, r"data\[0\]\.format='sharegpt' is invalid: allowed: \['rows', 'chat'"),
        ({"format": "chat"}, r"data\[0\]\.task=None is invalid: format chat needs the task's name"),
        ({"format": "chat", "task": "c", "columns": {"prompt": "q"}}, r"data\[0\]\.columns\.prompt='q' .*messages"),
        ({"format": "chat", "task": "c", "train_on": "first"}, r"data\[0\]\.train_on='first' .*\['all', 'last'\]"),
        ({"format": "chat", "task": "c", "split": "test"}, r"data\[0\]\.split='test' is invalid: a JSONL file"),
        ({"format": "chat", "task": "c", "use_as": "dev"}, r"data\[0\]\.use_as='dev' is invalid"),
        ({"format": "chat", "task": "c", "shuffle": True}, r"data\[0\]\.shuffle=True is invalid: unknown key"),
    ],
)
def test_a_bad_data_entry_names_its_field(tmp_path, entry, error):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(n) for n in range(4)])
    with pytest.raises(ValueError, match=error):
        tiny_data_recipe([{"path": str(path)} | entry])


# ---- training and evaluation ----------------------------------------------------------------------------------
def test_chat_alpaca_and_parquet_data_train_and_evaluate_from_a_recipe(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [conversation(n) for n in range(10)])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Echo {n}", "output": str(n)} for n in range(10)])
    pq.write_table(pa.table({"prompt": [f"{n}?" for n in range(10)], "answer": ["yes"] * 10}), tmp_path / "p.parquet")
    recipe = tiny_data_recipe(
        [
            {"path": str(chat), "format": "chat", "task": "support", "train_on": "last"},
            {"path": str(alpaca), "format": "alpaca", "task": "echo"},
            {"path": str(tmp_path / "p.parquet"), "format": "columns", "task": "yes"},
        ]
    )
    run = train(recipe, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())["tasks"]
    assert set(metrics) == {"support", "echo", "yes"}
    for scores in metrics.values():
        assert set(scores["model"]) == {"accuracy", "token_f1"} and scores["mode"] == "generate"
        assert scores["perplexity"]["model"] > 1 and scores["perplexity"]["zero_shot"] > 1
    summary = json.loads((run / "training.json").read_text())
    assert summary["dropped_turns"] == {"support": 0, "echo": 0, "yes": 0}


def test_answer_perplexity_is_the_answers_cross_entropy(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    examples = [
        Example("t", "Hi", "Hello there", context=(("user", "Q"), ("assistant", "A"))),
        Example("t", "Is it?", "yes"),
    ]
    losses, count = 0.0, 0
    for example in examples:  # one at a time, the answer's tokens alone (not the earlier assistant turn's)
        prompt = encode_example(example, tokenizer, 200, with_answer=False)["input_ids"]
        answer = tokenizer(example.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        losses += torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum").item()
        count += len(answer)
    expected = torch.tensor(losses / count).exp().item()
    assert answer_perplexity(model, tokenizer, examples, max_prompt_length=200) == pytest.approx(expected, rel=1e-5)
