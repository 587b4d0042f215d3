"""The medical tasks on the real files, answer parsing, metrics, JSONL tasks, encoding."""

import json

import pytest

from loramix.data import Example, collate, encode_example, get_task, load_jsonl_tasks, resolve_data_dir
from loramix.data.base import macro_f1
from loramix.models import tiny_tokenizer

SIZES = {
    "pubmedqa": {"train": 500, "test": 500},
    "mediqa_rqe": {"train": 8588, "validation": 302, "test": 230},
    "medical_abstracts": {"train": 2310, "test": 578},
    "symptom2disease": {"train": 960, "test": 240},
    "ncbi_disease": {"train": 5432, "validation": 923, "test": 940},
    "medqa_usmle": {"train": 1018, "test": 255},
}


@pytest.fixture(scope="module")
def splits():
    return {name: get_task(name).load() for name in SIZES}


def test_every_task_loads_with_its_split_sizes(splits):
    for name, sizes in SIZES.items():
        assert {split: len(examples) for split, examples in splits[name].items()} == sizes, name


def test_splits_are_deterministic_disjoint_and_stratified(splits):
    again = get_task("symptom2disease").load()
    assert [e.id for e in again["test"]] == [e.id for e in splits["symptom2disease"]["test"]]
    for name, parts in splits.items():
        ids = [e.id for examples in parts.values() for e in examples]
        assert len(ids) == len(set(ids)), name
    test_labels = [e.answer for e in splits["symptom2disease"]["test"]]
    assert {test_labels.count(label) for label in set(test_labels)} == {10}  # 50 a class, 20 % of each


def test_labels_and_answers(splits):
    assert {e.answer for e in splits["pubmedqa"]["test"]} == {"yes", "no", "maybe"}
    assert {e.answer for e in splits["mediqa_rqe"]["train"]} == {"yes", "no"}
    assert len({e.answer for e in splits["symptom2disease"]["train"]}) == 24
    assert {e.answer for e in splits["medqa_usmle"]["test"]} == {"A", "B", "C", "D"}
    assert get_task("medical_abstracts").choices[0] == "neoplasms"
    first = splits["ncbi_disease"]["train"][0]
    assert first.answer == "adenomatous polyposis coli tumour"  # B-Disease I-Disease I-Disease I-Disease
    assert not get_task("medqa_usmle").trainable


def test_pubmedqa_uses_the_official_test_ids(splits):
    official = set(json.loads((resolve_data_dir() / "pubmedqa/test_ground_truth.json").read_text()))
    assert {e.id for e in splits["pubmedqa"]["test"]} == official


@pytest.mark.parametrize(
    ("task", "generated", "parsed"),
    [
        ("pubmedqa", "Yes.", "yes"),
        ("pubmedqa", " maybe, the data are unclear", "maybe"),
        ("mediqa_rqe", "No", "no"),
        ("medqa_usmle", "The answer is C.", "C"),
        ("medqa_usmle", "B. Spinal metastasis", "B"),
        ("ncbi_disease", "Colon Cancer; ataxia;colon cancer", "ataxia; colon cancer"),
        ("ncbi_disease", "none", "none"),
    ],
)
def test_parse(task, generated, parsed):
    assert get_task(task).parse(generated) == parsed


def test_parse_prefers_the_first_and_longest_choice(splits):
    task = get_task("medical_abstracts")
    assert task.parse("Cardiovascular diseases, not neoplasms") == "cardiovascular diseases"


def test_macro_f1_by_hand():
    predictions = ["yes", "yes", "no", "maybe"]
    golds = ["yes", "no", "no", "no"]
    # yes: tp 1, pred 2, gold 1 -> 2/3; no: tp 1, pred 1, gold 3 -> 1/2; maybe: tp 0 -> 0
    assert macro_f1(predictions, golds, ("yes", "no", "maybe")) == pytest.approx((2 / 3 + 1 / 2) / 3)


def test_ner_f1_by_hand():
    task = get_task("ncbi_disease")
    examples = [Example("ncbi_disease", "", "breast cancer; ataxia"), Example("ncbi_disease", "", "none")]
    scores = task.score(["breast cancer; fever", "colitis"], examples)
    # predicted {(0, breast cancer), (0, fever), (1, colitis)}, gold {(0, breast cancer), (0, ataxia)}
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4})


def test_majority_baseline(splits):
    task = get_task("pubmedqa")
    scores = task.majority(splits["pubmedqa"]["train"], splits["pubmedqa"]["test"])
    share_yes = sum(e.answer == "yes" for e in splits["pubmedqa"]["test"]) / 500
    assert scores["accuracy"] == pytest.approx(share_yes)


def test_jsonl_tasks_and_their_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"task": "triage", "prompt": f"case {i}", "answer": "urgent" if i % 2 else "routine"} for i in range(10)]
    rows[0]["choices"] = ["urgent", "routine"]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_jsonl_tasks(path, register=False)["triage"]
    parts = task.load()
    assert len(parts["train"]) == 8 and len(parts["test"]) == 2
    assert task.parse("Urgent!") == "urgent"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n" + '{"task": "triage", "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer'"):
        load_jsonl_tasks(bad, register=False)
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        load_jsonl_tasks(bad, register=False)
    bad.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_jsonl_tasks(bad, register=False)


def test_missing_data_folder_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_task("pubmedqa").load()
    with pytest.raises(FileNotFoundError, match=r"missing data file .*ori_pqal.json"):
        get_task("pubmedqa").load(tmp_path)


def test_encoding_puts_loss_on_the_answer_only():
    tokenizer = tiny_tokenizer()
    row = encode_example(Example("t", "Is water wet?", "yes"), tokenizer, 200)
    labelled = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(labelled) == "yes<|im_end|>\n"
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>user\nIs water wet?<|im_end|>")
    assert not row["truncated"]


def test_truncation_drops_the_start_of_the_context_and_keeps_the_answer():
    tokenizer = tiny_tokenizer()
    example = Example("t", "A long context. " * 20 + "Question?", "yes")
    row = encode_example(example, tokenizer, 60)
    text = tokenizer.decode(row["input_ids"])
    assert len(row["input_ids"]) == 60 and row["truncated"]
    assert text.endswith("Question?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n")
    assert text.startswith("<|im_start|>user\n")
    prompt_only = encode_example(example, tokenizer, 60, with_answer=False)
    assert tokenizer.decode(prompt_only["input_ids"]).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="max_length=10"):
        encode_example(example, tokenizer, 10)


def test_collate_pads_both_sides():
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "task_id": 1},
        {"input_ids": [5], "attention_mask": [1], "labels": [5], "task_id": 0},
    ]
    right = collate(rows, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert right["task_ids"].tolist() == [1, 0]
    left = collate(rows, pad_token_id=0, padding_side="left")
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
