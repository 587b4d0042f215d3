"""The six built-in medical tasks (see shared/data/medical/SOURCES.md)."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from loramix.data.base import Example, Task, normalise, register_task, require_file, stratified_split


class PubMedQA(Task):
    name = "pubmedqa"
    choices = ("yes", "no", "maybe")
    max_new_tokens = 4

    def read(self, folder: Path) -> dict[str, list[Example]]:
        items = json.loads(require_file(folder, "pubmedqa/ori_pqal.json").read_text())
        test_ids = set(json.loads(require_file(folder, "pubmedqa/test_ground_truth.json").read_text()))
        splits: dict[str, list[Example]] = {"train": [], "test": []}
        for pubmed_id, item in items.items():
            prompt = (
                f"Abstract: {' '.join(item['CONTEXTS'])}\n\nQuestion: {item['QUESTION']}\nAnswer with yes, no or maybe."
            )
            example = Example(self.name, prompt, item["final_decision"], self.choices, pubmed_id)
            splits["test" if pubmed_id in test_ids else "train"].append(example)
        return splits


class MediqaRQE(Task):
    name = "mediqa_rqe"
    choices = ("yes", "no")
    max_new_tokens = 3
    files = {
        "train": "MEDIQA2019-Task2-RQE-TrainingSet-AMIA2016.xml",
        "validation": "MEDIQA2019-Task2-RQE-ValidationSet-AMIA2016.xml",
        "test": "MEDIQA2019-Task2-RQE-TestSet-wLabels.xml",
    }

    def read(self, folder: Path) -> dict[str, list[Example]]:
        splits = {}
        for split, name in self.files.items():
            root = ElementTree.parse(require_file(folder, f"mediqa2019_rqe/{name}")).getroot()
            splits[split] = [
                Example(
                    self.name,
                    f"Consumer question: {' '.join(pair.findtext('chq').split())}\n"
                    f"FAQ: {' '.join(pair.findtext('faq').split())}\n"
                    "Does answering the FAQ also answer the consumer question? Answer with yes or no.",
                    "yes" if pair.get("value") == "true" else "no",
                    self.choices,
                    f"{split}-{pair.get('pid')}",
                )
                for pair in root.iter("pair")
            ]
        return splits


class MedicalAbstracts(Task):
    name = "medical_abstracts"
    max_new_tokens = 8

    def read(self, folder: Path) -> dict[str, list[Example]]:
        with require_file(folder, "medical_abstracts/medical_tc_labels.csv").open(newline="") as f:
            labels = {row["condition_label"]: row["condition_name"] for row in csv.DictReader(f)}
        self.choices = tuple(labels.values())
        listed = ", ".join(self.choices)
        with require_file(folder, "medical_abstracts/medical_tc_test.csv").open(newline="") as f:
            examples = [
                Example(
                    self.name,
                    f"Abstract: {row['medical_abstract']}\n\nWhich topic is this abstract about? Answer with one of: "
                    f"{listed}.",
                    labels[row["condition_label"]],
                    self.choices,
                    str(index),
                )
                for index, row in enumerate(csv.DictReader(f))
            ]
        train, test = stratified_split(examples, 0.2)
        return {"train": train, "test": test}


class Symptom2Disease(Task):
    name = "symptom2disease"
    max_new_tokens = 10

    def read(self, folder: Path) -> dict[str, list[Example]]:
        with require_file(folder, "symptom2disease/Symptom2Disease.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        self.choices = tuple(sorted({row["label"] for row in rows}))
        listed = ", ".join(self.choices)
        examples = [
            Example(
                self.name,
                f"Patient: {row['text']}\n\nWhich diagnosis fits best? Answer with one of: {listed}.",
                row["label"],
                self.choices,
                str(index),
            )
            for index, row in enumerate(rows)
        ]
        train, test = stratified_split(examples, 0.2)
        return {"train": train, "test": test}


class NCBIDisease(Task):
    """Disease mention extraction; the answer lists the mentions, separated by '; ', or 'none'."""

    name = "ncbi_disease"
    max_new_tokens = 32
    files = {"train": "train.tsv", "validation": "devel.tsv", "test": "test.tsv"}

    def read(self, folder: Path) -> dict[str, list[Example]]:
        return {
            split: self._sentences(require_file(folder, f"ncbi_disease/{name}"), split)
            for split, name in self.files.items()
        }

    def _sentences(self, path: Path, split: str) -> list[Example]:
        examples, tokens, tags = [], [], []
        for line_number, line in enumerate(path.read_text().splitlines() + [""], start=1):
            if not line.strip():
                if tokens:
                    mentions = mentions_from_bio(tokens, tags)
                    prompt = (
                        f"Sentence: {' '.join(tokens)}\n\nList the disease mentions in the sentence, separated by "
                        "'; ', or answer none."
                    )
                    answer = "; ".join(mentions) if mentions else "none"
                    examples.append(Example(self.name, prompt, answer, None, f"{split}-{len(examples)}"))
                tokens, tags = [], []
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_number}: expected 'token<TAB>tag', got {line!r}")
            tokens.append(parts[0])
            tags.append(parts[1])
        return examples

    def parse(self, generated: str) -> str:
        mentions = sorted({normalise(m) for m in generated.split(";")} - {"", "none"})
        return "; ".join(mentions) if mentions else "none"

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Entity-level micro precision, recall and F1 over (sentence, mention) pairs."""
        predicted = {(i, m) for i, p in enumerate(predictions) for m in mention_set(p)}
        gold = {(i, m) for i, e in enumerate(examples) for m in mention_set(e.answer)}
        true_positives = len(predicted & gold)
        precision = true_positives / len(predicted) if predicted else 0.0
        recall = true_positives / len(gold) if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": f1, "precision": precision, "recall": recall}


def mentions_from_bio(tokens: list[str], tags: list[str]) -> list[str]:
    """The B-/I- tagged spans of a sentence, in order, each as its tokens joined by spaces."""
    mentions: list[list[str]] = []
    for token, tag in zip(tokens, tags, strict=True):
        if tag.startswith("B-"):
            mentions.append([token])
        elif tag.startswith("I-") and mentions:
            mentions[-1].append(token)
    return [" ".join(m) for m in mentions]


def mention_set(answer: str) -> set[str]:
    return {normalise(m) for m in answer.split(";")} - {"", "none"}


class MedQA(Task):
    """US medical licensing exam questions, four options; evaluation only by default."""

    name = "medqa_usmle"
    trainable = False
    choices = ("A", "B", "C", "D")
    max_new_tokens = 3

    def read(self, folder: Path) -> dict[str, list[Example]]:
        path = require_file(folder, "medqa_usmle/test.jsonl")
        examples = []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                item = json.loads(line)
                options = "\n".join(f"{letter}. {item['options'][letter]}" for letter in self.choices)
                answer = item["answer_idx"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{line_number}: malformed item ({error})") from None
            prompt = f"{item['question']}\n\n{options}\n\nAnswer with the letter of the correct option."
            examples.append(Example(self.name, prompt, answer, self.choices, str(item.get("realidx", line_number))))
        train, test = stratified_split(examples, 0.2)
        return {"train": train, "test": test}

    def parse(self, generated: str) -> str:
        match = re.search(r"\b([ABCD])\b", generated.strip())
        return match.group(1) if match else normalise(generated)


for task in (PubMedQA(), MediqaRQE(), MedicalAbstracts(), Symptom2Disease(), NCBIDisease(), MedQA()):
    register_task(task)
