"""The six built-in medical tasks on the files of shared/data/medical (see its SOURCES.md)."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ElementTree
from abc import abstractmethod
from pathlib import Path

from loramix.data.base import Example, Task, normalise, register_task
from loramix.data.metrics import micro_prf
from loramix.data.paths import require_file, resolve_data_dir
from loramix.data.splits import deduplicate, stratified_split

TEST_FRACTION = 0.2


def one_line(text: str) -> str:
    return " ".join(text.split())


class LabelsFromFile(Task):
    """A classification task whose label names are read from its data (from the default folder if asked before
    any load)."""

    _choices: tuple[str, ...] | None = None

    @property
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            self._choices = self.labels(resolve_data_dir())
        return self._choices

    @abstractmethod
    def labels(self, folder: Path) -> tuple[str, ...]:
        """The allowed answers, as the data names them."""


class PubMedQA(Task):
    """Yes / no / maybe answer to a research question over its abstract; test = the official 500 ids."""

    name = "pubmedqa"
    choices = ("yes", "no", "maybe")
    max_new_tokens = 8

    def read(self, folder: Path) -> dict[str, list[Example]]:
        items = json.loads(require_file(folder, "pubmedqa/ori_pqal.json").read_text())
        test_ids = set(json.loads(require_file(folder, "pubmedqa/test_ground_truth.json").read_text()))
        splits: dict[str, list[Example]] = {"train": [], "test": []}
        for pubmed_id, item in items.items():
            sections = "\n".join(
                f"{label}: {one_line(text)}" for label, text in zip(item["LABELS"], item["CONTEXTS"], strict=True)
            )
            prompt = f"Abstract:\n{sections}\n\nQuestion: {item['QUESTION']}\nAnswer with yes, no or maybe."
            example = Example(self.name, prompt, item["final_decision"], self.choices, pubmed_id)
            splits["test" if pubmed_id in test_ids else "train"].append(example)
        return splits


class MediqaRQE(Task):
    """Question entailment: does the FAQ's answer also answer the consumer's question? Official splits."""

    name = "mediqa_rqe"
    choices = ("yes", "no")
    metrics = ("accuracy",)
    max_new_tokens = 8
    files = {
        "train": "MEDIQA2019-Task2-RQE-TrainingSet-AMIA2016.xml",
        "validation": "MEDIQA2019-Task2-RQE-ValidationSet-AMIA2016.xml",
        "test": "MEDIQA2019-Task2-RQE-TestSet-wLabels.xml",
    }

    def read(self, folder: Path) -> dict[str, list[Example]]:
        splits = {}
        for split, name in self.files.items():
            path = require_file(folder, f"mediqa2019_rqe/{name}")
            splits[split] = [
                self._example(path, split, pair) for pair in ElementTree.parse(path).getroot().iter("pair")
            ]
        return splits

    def _example(self, path: Path, split: str, pair: ElementTree.Element) -> Example:
        chq, faq, value = pair.findtext("chq"), pair.findtext("faq"), pair.get("value")
        if chq is None or faq is None or value not in ("true", "false"):
            raise ValueError(f"{path}: pair {pair.get('pid')!r} needs <chq>, <faq> and value 'true' or 'false'")
        prompt = (
            f"Consumer question: {one_line(chq)}\nFAQ: {one_line(faq)}\n\n"
            "Does the answer to the FAQ also answer the consumer question, at least in part? Answer with yes or no."
        )
        return Example(
            self.name, prompt, "yes" if value == "true" else "no", self.choices, f"{split}-{pair.get('pid')}"
        )


class MedicalAbstracts(LabelsFromFile):
    """Topic of an abstract, 5 classes; abstracts listed under several topics are dropped; 80/20 stratified."""

    name = "medical_abstracts"
    max_new_tokens = 12

    def labels(self, folder: Path) -> tuple[str, ...]:
        return tuple(self._label_names(folder).values())

    def _label_names(self, folder: Path) -> dict[str, str]:
        with require_file(folder, "medical_abstracts/medical_tc_labels.csv").open(newline="") as f:
            return {row["condition_label"]: row["condition_name"] for row in csv.DictReader(f)}

    def read(self, folder: Path) -> dict[str, list[Example]]:
        names = self._label_names(folder)
        self._choices = tuple(names.values())
        instruction = "Which topic is this abstract about?"  # choices are scored, not listed: tokens go to the abstract
        with require_file(folder, "medical_abstracts/medical_tc_test.csv").open(newline="") as f:
            examples = [
                Example(
                    self.name,
                    f"Abstract: {one_line(row['medical_abstract'])}\n\n{instruction}",
                    names[row["condition_label"]],
                    self._choices,
                    str(index),
                )
                for index, row in enumerate(csv.DictReader(f))
            ]
        train, test = stratified_split(deduplicate(examples), TEST_FRACTION)
        return {"train": train, "test": test}


class Symptom2Disease(LabelsFromFile):
    """Diagnosis from a patient's description, 24 classes; repeated descriptions kept once; 80/20 stratified."""

    name = "symptom2disease"
    metrics = ("accuracy",)
    max_new_tokens = 16

    def labels(self, folder: Path) -> tuple[str, ...]:
        return tuple(sorted({row["label"] for row in self._rows(folder)}))

    def _rows(self, folder: Path) -> list[dict[str, str]]:
        with require_file(folder, "symptom2disease/Symptom2Disease.csv").open(newline="") as f:
            return list(csv.DictReader(f))

    def read(self, folder: Path) -> dict[str, list[Example]]:
        rows = self._rows(folder)
        self._choices = tuple(sorted({row["label"] for row in rows}))
        instruction = "Which diagnosis fits best?"  # the 24 diagnoses are scored, not listed (90 tokens saved)
        examples = [
            Example(
                self.name, f"Patient: {one_line(row['text'])}\n\n{instruction}", row["label"], self._choices, str(i)
            )
            for i, row in enumerate(rows)
        ]
        train, test = stratified_split(deduplicate(examples), TEST_FRACTION)
        return {"train": train, "test": test}


def normalise_mention(mention: str) -> str:
    """A disease mention as compared: normalised, without spaces around punctuation ("coli ( APC )" ->
    "coli(apc)")."""
    return re.sub(r"\s*([^\w\s])\s*", r"\1", normalise(mention))


def mention_set(answer: str) -> set[str]:
    """The normalised mentions of an answer ("a; b", one per line, or "none")."""
    return {normalise_mention(m) for m in re.split(r"[;\n]", answer)} - {"", "none"}


def mentions_from_bio(tokens: list[str], tags: list[str]) -> list[str]:
    """The tagged spans of a sentence in order, each its tokens joined by spaces; an I- tag after O starts a span."""
    mentions: list[list[str]] = []
    inside = False
    for token, tag in zip(tokens, tags, strict=True):
        if tag.startswith("B-") or (tag.startswith("I-") and not inside):
            mentions.append([token])
        elif tag.startswith("I-"):
            mentions[-1].append(token)
        inside = tag != "O"
    return [" ".join(m) for m in mentions]


class NCBIDisease(Task):
    """Disease mentions of a sentence, listed as "a; b" (each once, in order) or "none"; official splits."""

    name = "ncbi_disease"
    metrics = ("f1", "precision", "recall")
    max_new_tokens = 40  # answers: median 3 tokens, 99th percentile 28, longest 55 (train split)
    files = {"train": "train.tsv", "validation": "devel.tsv", "test": "test.tsv"}

    def read(self, folder: Path) -> dict[str, list[Example]]:
        return {
            split: self._sentences(require_file(folder, f"ncbi_disease/{name}"), split)
            for split, name in self.files.items()
        }

    def _sentences(self, path: Path, split: str) -> list[Example]:
        examples: list[Example] = []
        tokens: list[str] = []
        tags: list[str] = []
        for line_number, line in enumerate([*path.read_text().splitlines(), ""], start=1):
            if line.strip():
                parts = line.split("\t")
                if len(parts) != 2 or parts[1][:2] not in ("O", "B-", "I-"):
                    raise ValueError(f"{path}:{line_number}: expected 'token<TAB>O|B-…|I-…', got {line!r}")
                tokens.append(parts[0])
                tags.append(parts[1])
            elif tokens:
                unique: dict[str, str] = {}
                for mention in mentions_from_bio(tokens, tags):
                    unique.setdefault(normalise_mention(mention), mention)
                mentions = list(unique.values())
                prompt = (
                    f"Sentence: {' '.join(tokens)}\n\nList the disease mentions of the sentence exactly as written, "
                    "separated by '; '. Answer none if there are none."
                )
                answer = "; ".join(mentions) if mentions else "none"
                examples.append(Example(self.name, prompt, answer, None, f"{split}-{len(examples)}"))
                tokens, tags = [], []
        return examples

    def parse(self, generated: str) -> str:
        """The distinct normalised mentions named, sorted and joined by '; ', or "none"."""
        mentions = sorted(mention_set(generated))
        return "; ".join(mentions) if mentions else "none"

    def score(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """Entity-level micro precision, recall and F1 over (sentence, normalised mention) pairs."""
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples of {self.name}")
        predicted = {(i, m) for i, p in enumerate(predictions) for m in mention_set(p)}
        gold = {(i, m) for i, e in enumerate(examples) for m in mention_set(e.answer)}
        return micro_prf(predicted, gold)


class MedQA(Task):
    """US medical licensing exam questions with options A-D; evaluation only by default; 80/20 stratified."""

    name = "medqa_usmle"
    trainable = False
    choices = ("A", "B", "C", "D")
    metrics = ("accuracy",)
    max_new_tokens = 8
    # The answer letter: alone at the start ("B", "B.", "(B)"), after "answer", as "B." / "(B)", or a lone capital.
    patterns = (
        r"^\s*\(?([ABCD])(?:[.):\]]|\s*$)",
        r"(?i:answer|option)\s*(?:is|:)?\s*\(?([ABCD])\b",
        r"(?<!\w)\(?([ABCD])[.)]",
        r"(?<!\w)([ABCD])(?!\w)",
    )

    def read(self, folder: Path) -> dict[str, list[Example]]:
        path = require_file(folder, "medqa_usmle/test.jsonl")
        examples = []
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                item = json.loads(line)
                options = "\n".join(f"{letter}. {item['options'][letter]}" for letter in self.choices)
                answer, question = item["answer_idx"], item["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{line_number}: malformed item ({error!r})") from None
            if answer not in self.choices:
                raise ValueError(f"{path}:{line_number}: answer_idx {answer!r} is not one of {self.choices}")
            prompt = f"Question: {question}\n\n{options}\n\nAnswer with the letter of the correct option: A, B, C or D."
            examples.append(Example(self.name, prompt, answer, self.choices, str(item.get("realidx", line_number))))
        train, test = stratified_split(deduplicate(examples), TEST_FRACTION)
        return {"train": train, "test": test}

    def parse(self, generated: str) -> str:
        """The answer letter named (see `patterns`), else the normalised text."""
        for pattern in self.patterns:
            match = re.search(pattern, generated)
            if match:
                return match.group(1)
        return normalise(generated)


for builtin in (PubMedQA(), MediqaRQE(), MedicalAbstracts(), Symptom2Disease(), NCBIDisease(), MedQA()):
    register_task(builtin)
