"""C-Eval evaluation: the data, the two prompt protocols, a resumable result cache, the scores.

Standard library only, so the launcher's evaluation logic is tested without a model or torch.

Data is the official ceval-exam layout: DIR/dev/{subject}_dev.csv (5 worked examples per subject),
DIR/val/{subject}_val.csv (the questions with answers) and DIR/subject_mapping.json
(subject -> [English name, Chinese name, category]); a copy of the mapping ships with the package.

Two prompt protocols:
  official -- the C-Eval authors' Chinese few-shot prompt (`official_prompt`).
  atb      -- the Ascend reference script's English prompt (`atb_prompt`); its answer is the first
              letter the model writes (`first_letter`).

Scores are reported both ways found in the wild: per category over questions and "Avg acc" over all
questions (the Ascend reference), and "Subject avg", the mean of per-subject accuracies (C-Eval's).
"""
from __future__ import annotations

import csv
import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

CHOICES = ("A", "B", "C", "D")
CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")
COLUMNS = ("id", "question", *CHOICES, "answer")  # required; dev's `explanation` is ignored
BUILTIN_MAPPING = Path(__file__).with_name("ceval_mapping.json")


class CevalError(ValueError):
    """Bad C-Eval data, subject selection or result cache; the message names the file / subject / row."""


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str


@dataclass(frozen=True)
class SubjectInfo:
    english: str
    chinese: str
    category: str


def load_mapping(data_dir: str | Path | None) -> dict[str, SubjectInfo]:
    """subject -> SubjectInfo from data_dir/subject_mapping.json when present, else the built-in copy."""
    path = Path(data_dir, "subject_mapping.json") if data_dir is not None else BUILTIN_MAPPING
    if not path.is_file():
        path = BUILTIN_MAPPING
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an absurdly long int or deep nesting
        raise CevalError(f"{path}: not a JSON subject mapping: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise CevalError(f"{path}: expected a non-empty object subject -> [English, Chinese, category]")
    mapping = {}
    for subject, value in raw.items():
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
            raise CevalError(f"{path}: subject {subject!r}: expected [English name, Chinese name, category], "
                             f"got {value!r}")
        if value[2] not in CATEGORIES:
            raise CevalError(f"{path}: subject {subject!r}: category {value[2]!r} is not one of "
                             f"{', '.join(CATEGORIES)}")
        mapping[subject] = SubjectInfo(*value)
    return mapping


def load_split(data_dir: str | Path, subject: str, split: str) -> list[Question]:
    """The questions of data_dir/{split}/{subject}_{split}.csv in file order; split is "dev" or "val".

    Question text and choices are kept verbatim (prompts must match the reference byte for byte);
    id and answer are stripped. Choices may be empty; question, id and answer may not.
    """
    if split not in ("dev", "val"):
        raise CevalError(f"C-Eval split {split!r}: expected 'dev' or 'val'")
    path = Path(data_dir, split, f"{subject}_{split}.csv")
    if not path.is_file():
        raise CevalError(f"{path}: missing (the {split} split of C-Eval subject {subject!r})")
    questions: list[Question] = []
    ids: set[str] = set()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": quoted cells hold newlines
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise CevalError(f"{path}: missing column(s) {', '.join(missing)}")
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                if any(row[c] is None for c in COLUMNS):
                    raise CevalError(f"{where}: the row has fewer cells than the header")
                id_, answer = row["id"].strip(), row["answer"].strip()
                where += f", id {id_!r}"
                if not id_:
                    raise CevalError(f"{where}: empty id")
                # The result cache keys on (subject, id): a repeated id would be skipped on resume.
                if id_ in ids:
                    raise CevalError(f"{where}: repeated id")
                if not row["question"].strip():
                    raise CevalError(f"{where}: empty question")
                if answer not in CHOICES:
                    raise CevalError(f"{where}: answer {row['answer']!r} is not one of {', '.join(CHOICES)}")
                ids.add(id_)
                choices = (row["A"], row["B"], row["C"], row["D"])
                questions.append(Question(subject, id_, row["question"], choices, answer))
    except (csv.Error, UnicodeDecodeError) as e:
        raise CevalError(f"{path}: not a readable UTF-8 csv file: {e}") from None
    if not questions:  # a truncated download, not a subject with nothing to ask
        raise CevalError(f"{path}: no questions")
    return questions


def resolve_subjects(mapping: Mapping[str, SubjectInfo], subjects: str | Sequence[str] | None) -> list[str]:
    """The subjects to evaluate: None -> all (sorted); "a,b" or [a, b] -> those, de-duplicated in order."""
    if subjects is None:
        return sorted(mapping)
    if isinstance(subjects, str):
        subjects = [s.strip() for s in subjects.split(",") if s.strip()]
    chosen = list(dict.fromkeys(subjects))
    if not chosen:
        raise CevalError("no C-Eval subjects selected")
    unknown = [s for s in chosen if s not in mapping]
    if unknown:
        names = []
        for s in unknown:
            close = difflib.get_close_matches(str(s), list(mapping), n=1)
            names.append(f"{s!r} (did you mean {close[0]!r}?)" if close else repr(s))
        raise CevalError(f"unknown C-Eval subject(s): {', '.join(names)}; "
                         f"the {len(mapping)} known ones are the keys of subject_mapping.json")
    return chosen


def check_data_dir(data_dir: str | Path) -> Path:
    """data_dir as a Path, after checking it has the official layout (fail before loading a model)."""
    path = Path(data_dir)
    if not ((path / "dev").is_dir() and (path / "val").is_dir()):
        raise CevalError(f"C-Eval data not found at {path}: expected dev/{{subject}}_dev.csv and "
                         "val/{subject}_val.csv (the official ceval-exam layout)")
    return path


def _example(q: Question) -> str:
    a, b, c, d = q.choices
    return f"{q.question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n"


def official_prompt(info: SubjectInfo, shots: list[Question], question: Question) -> str:
    """The C-Eval authors' prompt: a Chinese header, the solved shots, then the question up to "答案："."""
    prompt = f"以下是中国关于{info.chinese}考试的单项选择题，请选出其中的正确答案。\n\n"
    prompt += "".join(f"{_example(s)}答案：{s.answer}\n\n" for s in shots)
    return prompt + f"{_example(question)}答案："


def atb_prompt(subject: str, shots: list[Question], question: Question) -> str:
    """The Ascend reference script's prompt: MMLU-style English header, shots, then "Answer:"."""
    name = subject.replace("_", " ")
    prompt = f"The following are multiple choice questions (with answers) about {name}.\n\n"
    prompt += "".join(f"{_example(s)}Answer: {s.answer}\n\n" for s in shots)
    return prompt + f"{_example(question)}Answer:"


def fit_prompt(make: Callable[[list[Question]], str], shots: list[Question],
               fits: Callable[[str], bool]) -> tuple[str, int]:
    """(prompt, shots used): drop shots from the end until fits(prompt); with 0 shots return it anyway."""
    n = len(shots)
    prompt = make(shots[:n])
    while n > 0 and not fits(prompt):
        n -= 1
        prompt = make(shots[:n])
    return prompt, n


def first_letter(text: str) -> str | None:
    """The atb protocol's answer: the first ASCII letter of the generated text, upper-cased, or None."""
    m = re.search(r"[A-Za-z]", text)
    return m.group().upper() if m else None


CACHE_COLUMNS = ("subject", "id", "answer", "prediction", "correct")


class ResultCache:
    """DIR/cache0.csv, one row per answered question, so an interrupted evaluation resumes where it stopped.

    Columns CACHE_COLUMNS; `correct` is stored as 1/0 and a prediction of None (no answer) as "".
    Rows are appended and fsynced per batch: a killed run loses at most that batch, and a torn last
    row is cut off on the next start. The sidecar DIR/cache0.meta.json holds the run's fingerprint
    (model, data, protocol, shots, ...) so rows of different runs are never mixed.
    """

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        self.path = self.directory / "cache0.csv"
        self.meta = self.directory / "cache0.meta.json"
        fingerprint = json.loads(json.dumps(fingerprint))  # compare as stored: tuples become lists
        self.directory.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict] = []
        if self.path.exists():
            self._check_fingerprint(fingerprint)
            self._rows, end = _read_cache(self.path)
            if end < self.path.stat().st_size:
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
        else:
            # The sidecar goes first, so a cache0.csv never exists without its fingerprint.
            tmp = self.meta.with_suffix(".tmp")
            tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                           encoding="utf-8")
            os.replace(tmp, self.meta)
            end = 0
        if end == 0:  # a new cache, or one killed while writing its header
            self._write([list(CACHE_COLUMNS)])

    def _check_fingerprint(self, fingerprint: dict) -> None:
        try:
            old = json.loads(self.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        advice = "use another output directory or delete it"
        if not isinstance(old, dict):
            raise CevalError(f"the cache in {self.directory} has no readable {self.meta.name}, so the model/"
                             f"data set/protocol it comes from is unknown: {advice}")
        absent = "<absent>"
        diffs = [f"{k}: {old.get(k, absent)} vs {fingerprint.get(k, absent)}"
                 for k in sorted(old.keys() | fingerprint.keys())
                 if old.get(k, absent) != fingerprint.get(k, absent)]
        if diffs:
            raise CevalError(f"the cache in {self.directory} comes from another model/data set/protocol "
                             f"({'; '.join(diffs)}; cached vs this run): {advice}")

    def _write(self, records: list[list]) -> None:
        # csv's default "\r\n" line end makes it quote any cell holding "\r" or "\n".
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(records)
            f.flush()
            os.fsync(f.fileno())

    def done(self) -> set[tuple[str, str]]:
        """(subject, id) of the questions already answered."""
        return {(r["subject"], r["id"]) for r in self._rows}

    def rows(self) -> list[dict]:
        """All rows: the CACHE_COLUMNS keys, prediction a str, correct a bool."""
        return [dict(r) for r in self._rows]

    def append(self, rows: list[dict]) -> None:
        """Add one batch of rows (dicts with the CACHE_COLUMNS keys), durably."""
        new = [{"subject": r["subject"], "id": r["id"], "answer": r["answer"],
                "prediction": r["prediction"] or "", "correct": bool(r["correct"])} for r in rows]
        self._write([[r["subject"], r["id"], r["answer"], r["prediction"], int(r["correct"])] for r in new])
        self._rows += new


def _read_cache(path: Path) -> tuple[list[dict], int]:
    """The complete rows of a cache file, and the number of bytes they span (header included).

    Only the last row can be torn by a killed run: cut short (no line end, an open quote, half a UTF-8
    character) or with too few fields. It is left out; a bad row anywhere else is an error.
    """
    data = path.read_bytes()
    pos = 0

    def lines() -> Iterator[str]:  # csv reads one line at a time, so `pos` is where the last record ends
        nonlocal pos
        for line in data.splitlines(keepends=True):
            pos += len(line)
            yield line.decode("utf-8")

    reader = csv.reader(lines(), strict=True)
    records, end = [], 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except (csv.Error, UnicodeDecodeError) as e:
            if pos == len(data):
                break
            raise CevalError(f"{path}: corrupt near byte {pos}: {e}") from None
        if not data.endswith(b"\n", 0, pos) or len(record) != len(CACHE_COLUMNS):
            if pos == len(data):
                break
            raise CevalError(f"{path}: corrupt row ending at byte {pos}: {record!r}")
        records.append(record)
        end = pos
    if records and records[0] != list(CACHE_COLUMNS):
        raise CevalError(f"{path}: not a result cache (header {','.join(records[0])}, "
                         f"expected {','.join(CACHE_COLUMNS)})")
    rows = []
    for i, (subject, id_, answer, prediction, correct) in enumerate(records[1:], 2):
        if correct not in ("0", "1"):
            raise CevalError(f"{path}: record {i}: correct is {correct!r}, expected 1 or 0")
        rows.append({"subject": subject, "id": id_, "answer": answer, "prediction": prediction,
                     "correct": correct == "1"})
    return rows, end


def score(rows: list[dict], mapping: Mapping[str, SubjectInfo]) -> tuple[dict[str, float], dict[str, float]]:
    """(subject_acc, classes_acc) of result rows (dicts with "subject" and "correct").

    subject_acc: subject -> accuracy, sorted by subject. classes_acc: each category that has questions
    (accuracy over its questions, as the Ascend reference reports), "Avg acc" over all questions and
    "Subject avg", the mean of the subject accuracies (C-Eval's own average). A category with no
    questions is left out rather than reported as 0.
    """
    counts: dict[str, list[int]] = {}  # subject -> [correct, total]
    for r in rows:
        if r["subject"] not in mapping:
            raise CevalError(f"result for unknown C-Eval subject {r['subject']!r}")
        c = counts.setdefault(r["subject"], [0, 0])
        c[0] += bool(r["correct"])
        c[1] += 1
    if not counts:
        raise CevalError("no results to score")

    def acc(subjects: list[str]) -> float:
        return sum(counts[s][0] for s in subjects) / sum(counts[s][1] for s in subjects)

    subject_acc = {s: acc([s]) for s in sorted(counts)}
    classes_acc = {}
    for category in CATEGORIES:
        members = [s for s in counts if mapping[s].category == category]
        if members:
            classes_acc[category] = acc(members)
    classes_acc["Avg acc"] = acc(list(counts))
    classes_acc["Subject avg"] = sum(subject_acc.values()) / len(subject_acc)
    return subject_acc, classes_acc


def format_table(classes_acc: Mapping[str, float]) -> str:
    """classes_acc as a two-column text table, accuracy in percent with 2 decimals."""
    width = max([len("Category"), *map(len, classes_acc)])
    lines = [f"{'Category':<{width}}  Accuracy"]
    lines += [f"{k:<{width}}  {100 * v:7.2f}%" for k, v in classes_acc.items()]
    return "\n".join(lines)
