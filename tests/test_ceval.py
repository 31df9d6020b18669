"""tp.ceval on the data set at hand (the real C-Eval in CI, else the built-in demo set): mapping, loading
and its refusals, prompts, result cache, scores."""
import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MULTILINE_SUBJECT, REAL_CEVAL, SUBJECTS, VAL_PER_CATEGORY

from tp.ceval import (CATEGORIES, BUILTIN_MAPPING, CevalError, Question, ResultCache,
                      SubjectInfo, atb_prompt, check_data_dir, first_letter, fit_prompt, format_table,
                      load_mapping, load_split, official_prompt, resolve_subjects, score)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def raw_rows(path: Path) -> list[dict]:
    """The csv rows as plain dicts, read independently of tp.ceval."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


# --- mapping and data -----------------------------------------------------------------------------------

def test_mapping_from_file_and_builtin_copy(ceval_dir, tmp_path):
    builtin = load_mapping(None)
    assert builtin == load_mapping(tmp_path)  # no file there -> built-in copy
    assert len(builtin) == 52
    assert {info.category for info in builtin.values()} == set(CATEGORIES)
    assert builtin["accountant"] == SubjectInfo("Accountant", "注册会计师", "Other")
    from_file = load_mapping(ceval_dir)
    raw = json.loads((ceval_dir / "subject_mapping.json").read_text(encoding="utf-8"))
    assert from_file == {s: SubjectInfo(*v) for s, v in raw.items()}
    assert {info.category for info in from_file.values()} == set(CATEGORIES)
    # the official file is the built-in copy; the demo set maps its own subjects
    assert (json.loads(BUILTIN_MAPPING.read_text()) == raw) == bool(REAL_CEVAL)


def test_val_and_dev_sizes(ceval_dir):
    mapping = load_mapping(ceval_dir)
    per_category = Counter()
    for subject, info in mapping.items():
        per_category[info.category] += len(load_split(ceval_dir, subject, "val"))
        assert len(load_split(ceval_dir, subject, "dev")) == 5
    assert per_category == VAL_PER_CATEGORY


def test_load_split_keeps_rows_verbatim_and_in_order(ceval_dir):
    subject = MULTILINE_SUBJECT
    for split in ("dev", "val"):
        raw = raw_rows(ceval_dir / split / f"{subject}_{split}.csv")
        got = load_split(ceval_dir, subject, split)
        assert [q.id for q in got] == [r["id"] for r in raw]
        assert [(q.subject, q.question, q.choices, q.answer) for q in got] == [
            (subject, r["question"], (r["A"], r["B"], r["C"], r["D"]), r["answer"]) for r in raw]
    # a quoted multi-line cell keeps its CRLF line ends
    assert "\r\n\t" in load_split(ceval_dir, subject, "dev")[3].question


# --- load_split refusals ---------------------------------------------------------------------------------

def test_load_split_missing_file(tmp_path):
    with pytest.raises(CevalError, match="missing") as e:
        load_split(tmp_path, "accountant", "val")
    assert str(tmp_path / "val" / "accountant_val.csv") in str(e.value)


def test_load_split_missing_column(ceval_dir, tmp_path):
    subject = SUBJECTS[0]
    raw = raw_rows(ceval_dir / "val" / f"{subject}_val.csv")
    header = ["id", "question", "A", "B", "D", "answer"]
    path = write_csv(tmp_path / "val" / f"{subject}_val.csv", header, [[r[k] for k in header] for r in raw])
    with pytest.raises(CevalError, match=r"missing column\(s\) C$") as e:
        load_split(tmp_path, subject, "val")
    assert str(path) in str(e.value)


def test_load_split_bad_answer(ceval_dir, tmp_path):
    shutil.copytree(ceval_dir / "val", tmp_path / "val")
    path = tmp_path / "val" / f"{SUBJECTS[0]}_val.csv"
    path.chmod(0o644)
    raw = raw_rows(path)
    raw[3]["answer"] = "E"
    write_csv(path, list(raw[0]), [list(r.values()) for r in raw])
    with pytest.raises(CevalError) as e:
        load_split(tmp_path, SUBJECTS[0], "val")
    msg = str(e.value)
    assert str(path) in msg and f"id '{raw[3]['id']}'" in msg and "answer 'E' is not one of A, B, C, D" in msg


def test_load_split_empty_question_short_row_repeated_id(tmp_path):
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    path = tmp_path / "val" / "x_val.csv"
    write_csv(path, header, [["0", "  ", "1", "2", "3", "4", "A"]])
    with pytest.raises(CevalError, match="line 2, id '0': empty question"):
        load_split(tmp_path, "x", "val")
    write_csv(path, header, [["0", "q", "1", "2", "A"]])
    with pytest.raises(CevalError, match="fewer cells"):
        load_split(tmp_path, "x", "val")
    write_csv(path, header, [["0", "q", "", "", "", "", " B "], ["0", "q", "1", "2", "3", "4", "A"]])
    with pytest.raises(CevalError, match="line 3, id '0': repeated id"):
        load_split(tmp_path, "x", "val")
    write_csv(path, header, [["0", "q", "", "", "", "", " B "]])  # empty choices are allowed, answer stripped
    assert load_split(tmp_path, "x", "val") == [Question("x", "0", "q", ("", "", "", ""), "B")]


# --- subjects and data dir -------------------------------------------------------------------------------

def test_resolve_subjects():
    mapping = load_mapping(None)
    assert resolve_subjects(mapping, None) == sorted(mapping)
    assert resolve_subjects(mapping, "law") == ["law"]
    assert resolve_subjects(mapping, "law, accountant,law") == ["law", "accountant"]
    assert resolve_subjects(mapping, ["physician", "law", "physician"]) == ["physician", "law"]
    with pytest.raises(CevalError) as e:
        resolve_subjects(mapping, ["law", "acountant", "zzz"])
    assert str(e.value).startswith("unknown C-Eval subject(s): 'acountant' (did you mean 'accountant'?), 'zzz';")
    with pytest.raises(CevalError, match="no C-Eval subjects selected"):
        resolve_subjects(mapping, [])


def test_check_data_dir(ceval_dir, tmp_path):
    assert check_data_dir(str(ceval_dir)) == ceval_dir
    missing = tmp_path / "nope"
    with pytest.raises(CevalError) as e:
        check_data_dir(missing)
    assert str(e.value) == (f"C-Eval data not found at {missing}: expected dev/{{subject}}_dev.csv and "
                            "val/{subject}_val.csv (the official ceval-exam layout)")
    (tmp_path / "dev").mkdir()
    with pytest.raises(CevalError, match="C-Eval data not found"):
        check_data_dir(tmp_path)  # no val/


# --- prompts ---------------------------------------------------------------------------------------------

def test_official_prompt_byte_for_byte(ceval_dir):
    subject = SUBJECTS[0]
    dev = raw_rows(ceval_dir / "dev" / f"{subject}_dev.csv")
    val = raw_rows(ceval_dir / "val" / f"{subject}_val.csv")
    assert len(dev) == 5 and val[0]["id"] == "0"
    chinese = json.loads((ceval_dir / "subject_mapping.json").read_text(encoding="utf-8"))[subject][1]
    expected = f"以下是中国关于{chinese}考试的单项选择题，请选出其中的正确答案。\n\n"
    for r in dev:
        expected += f"{r['question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案：{r['answer']}\n\n"
    q = val[0]
    expected += f"{q['question']}\nA. {q['A']}\nB. {q['B']}\nC. {q['C']}\nD. {q['D']}\n答案："

    mapping = load_mapping(ceval_dir)
    got = official_prompt(mapping[subject], load_split(ceval_dir, subject, "dev"),
                          load_split(ceval_dir, subject, "val")[0])
    assert got.encode("utf-8") == expected.encode("utf-8")
    assert got.endswith("答案：") and "\uff1a" in got


def test_atb_prompt_byte_for_byte(ceval_dir):
    subject = SUBJECTS[1]
    dev = raw_rows(ceval_dir / "dev" / f"{subject}_dev.csv")
    q = raw_rows(ceval_dir / "val" / f"{subject}_val.csv")[4]
    expected = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    for r in dev:
        expected += f"{r['question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\nAnswer: {r['answer']}\n\n"
    expected += f"{q['question']}\nA. {q['A']}\nB. {q['B']}\nC. {q['C']}\nD. {q['D']}\nAnswer:"

    got = atb_prompt(subject, load_split(ceval_dir, subject, "dev"), load_split(ceval_dir, subject, "val")[4])
    assert got.encode("utf-8") == expected.encode("utf-8")


def test_fit_prompt_drops_shots_from_the_end(ceval_dir):
    shots = load_split(ceval_dir, SUBJECTS[0], "dev")
    calls = []

    def make(used: list[Question]) -> str:
        calls.append([s.id for s in used])
        return "".join(s.id for s in used) + "?"

    assert fit_prompt(make, shots, lambda p: True) == ("01234?", 5)
    calls.clear()
    assert fit_prompt(make, shots, lambda p: len(p) <= 3) == ("01?", 2)
    assert calls == [["0", "1", "2", "3", "4"], ["0", "1", "2", "3"], ["0", "1", "2"], ["0", "1"]]
    assert fit_prompt(make, shots, lambda p: False) == ("?", 0)  # the question is never dropped
    assert fit_prompt(make, [], lambda p: False) == ("?", 0)


@pytest.mark.parametrize("text, letter", [("  b) foo", "B"), ("答案是C", "C"), ("123", None), ("", None),
                                          ("D", "D"), ("：x. A", "X"), ("é A", "A")])
def test_first_letter(text, letter):
    assert first_letter(text) == letter


# --- result cache ----------------------------------------------------------------------------------------

FP = {"model": "/m/internlm-7b", "config": "ab12", "data": "sha256:ff", "protocol": "official", "shots": 5}


def row(i: int, correct: bool = True, prediction: str | None = "A") -> dict:
    return dict(subject="accountant", id=str(i), answer="A", prediction=prediction, correct=correct)


def test_cache_new_files_and_resume(tmp_path):
    cache = ResultCache(tmp_path / "out", FP)
    assert (tmp_path / "out" / "cache0.csv").read_bytes() == b"subject,id,answer,prediction,correct\r\n"
    assert json.loads((tmp_path / "out" / "cache0.meta.json").read_text()) == FP
    assert cache.done() == set() and cache.rows() == []
    cache.append([row(0), row(1, False, None)])
    cache.append([row(2, False, 'x,"y"\r\nz')])

    again = ResultCache(tmp_path / "out", dict(FP))
    assert again.done() == {("accountant", "0"), ("accountant", "1"), ("accountant", "2")}
    assert again.rows() == cache.rows() == [row(0), row(1, False, ""), row(2, False, 'x,"y"\r\nz')]
    lines = (tmp_path / "out" / "cache0.csv").read_text(encoding="utf-8").splitlines()
    assert lines[2] == "accountant,1,A,,0"  # None stored as "", correct as 1/0


@pytest.mark.parametrize("torn", [b"accountant,3,A,B", b"accountant,3,A,B,0\r", b"accountant,3,A\r\n",
                                  b'accountant,3,A,"B\r\nC', "accountant,3,A,答".encode()[:-1]])
def test_cache_drops_torn_last_row_and_repairs_file(tmp_path, torn):
    cache = ResultCache(tmp_path, FP)
    cache.append([row(0), row(1, False)])
    good = (tmp_path / "cache0.csv").read_bytes()
    with open(tmp_path / "cache0.csv", "ab") as f:
        f.write(torn)

    resumed = ResultCache(tmp_path, FP)
    assert resumed.rows() == [row(0), row(1, False)]
    assert (tmp_path / "cache0.csv").read_bytes() == good
    resumed.append([row(3)])
    assert ResultCache(tmp_path, FP).rows() == [row(0), row(1, False), row(3)]


def test_cache_refuses_corrupt_middle_row(tmp_path):
    ResultCache(tmp_path, FP).append([row(0)])
    with open(tmp_path / "cache0.csv", "ab") as f:
        f.write(b"accountant,1,A\r\naccountant,2,A,A,1\r\n")
    with pytest.raises(CevalError, match="corrupt row"):
        ResultCache(tmp_path, FP)


def test_cache_refuses_another_run(tmp_path):
    ResultCache(tmp_path, FP).append([row(0)])
    with pytest.raises(CevalError) as e:
        ResultCache(tmp_path, {**FP, "protocol": "atb", "shots": 0})
    msg = str(e.value)
    assert f"the cache in {tmp_path} comes from another model/data set/protocol" in msg
    assert "(protocol: official vs atb; shots: 5 vs 0; cached vs this run)" in msg
    assert "another output directory or delete it" in msg
    with pytest.raises(CevalError, match="extra: <absent> vs 1"):
        ResultCache(tmp_path, {**FP, "extra": 1})
    (tmp_path / "cache0.meta.json").unlink()
    with pytest.raises(CevalError, match="no readable cache0.meta.json"):
        ResultCache(tmp_path, FP)


text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12)


@FUZZ
@given(rows=st.lists(st.tuples(text, text, st.one_of(st.none(), text), st.booleans()), max_size=8),
       cut=st.integers(min_value=0))
def test_fuzz_cache_truncated_anywhere_keeps_the_complete_rows(tmp_path_factory, rows, cut):
    directory = tmp_path_factory.mktemp("cache")
    cache, written, ends = ResultCache(directory, FP), [], []
    for s, i, p, c in rows:
        cache.append([{"subject": s, "id": i, "answer": "A", "prediction": p, "correct": c}])
        written.append({"subject": s, "id": i, "answer": "A", "prediction": p or "", "correct": c})
        ends.append((directory / "cache0.csv").stat().st_size)  # where this row's bytes end
    assert ResultCache(directory, FP).rows() == written
    cut %= (directory / "cache0.csv").stat().st_size + 1
    with open(directory / "cache0.csv", "r+b") as f:
        f.truncate(cut)  # a run killed at any byte
    assert ResultCache(directory, FP).rows() == [r for r, end in zip(written, ends) if end <= cut]
    assert ResultCache(directory, FP).rows() == [r for r, end in zip(written, ends) if end <= cut]  # repaired


# --- scores ----------------------------------------------------------------------------------------------

def test_score_per_category_over_questions_vs_subject_average():
    mapping = load_mapping(None)
    rows = [{"subject": "advanced_mathematics", "id": "0", "correct": True}] + \
           [{"subject": "college_physics", "id": str(i), "correct": False} for i in range(3)] + \
           [{"subject": "law", "id": str(i), "correct": True} for i in range(2)]
    subject_acc, classes_acc = score(rows, mapping)
    assert subject_acc == {"advanced_mathematics": 1.0, "college_physics": 0.0, "law": 1.0}
    # no Social Science or Other questions: those categories are left out
    assert list(classes_acc) == ["STEM", "Humanities", "Avg acc", "Subject avg"]
    assert classes_acc["STEM"] == 1 / 4  # over questions; the mean of its subjects would be 1/2
    assert classes_acc["Humanities"] == 1.0
    assert classes_acc["Avg acc"] == 3 / 6
    assert classes_acc["Subject avg"] == pytest.approx(2 / 3)
    table = format_table(classes_acc)
    assert table.splitlines() == ["Category     Accuracy", "STEM           25.00%", "Humanities    100.00%",
                                  "Avg acc        50.00%", "Subject avg    66.67%"]
    with pytest.raises(CevalError, match="unknown C-Eval subject 'nope'"):
        score([{"subject": "nope", "correct": True}], mapping)
    with pytest.raises(CevalError, match="no results"):
        score([], mapping)


def test_score_from_cache_rows(tmp_path):
    cache = ResultCache(tmp_path, FP)
    cache.append([{"subject": s, "id": "0", "answer": "A", "prediction": p, "correct": p == "A"}
                  for s, p in [("law", "A"), ("physician", None), ("marxism", "A")]])
    subject_acc, classes_acc = score(ResultCache(tmp_path, FP).rows(), load_mapping(None))
    assert subject_acc == {"law": 1.0, "marxism": 1.0, "physician": 0.0}
    assert classes_acc == {"Social Science": 1.0, "Humanities": 1.0, "Other": 0.0, "Avg acc": 2 / 3,
                           "Subject avg": 2 / 3}


# --- fuzz: bad data gives CevalError, never another exception --------------------------------------------

cell = st.text(max_size=8) | st.sampled_from(["A", " B ", "c", "E", "", "\r\n", '"'])
header = st.lists(st.sampled_from(["id", "question", "A", "B", "C", "D", "answer", "explanation", ""]),
                  min_size=0, max_size=9)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_load_split_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ceval") / "val" / "s_val.csv"
    path.parent.mkdir()
    path.write_bytes(data)
    try:
        assert all(isinstance(q, Question) for q in load_split(path.parents[1], "s", "val"))
    except CevalError as e:
        assert str(path) in str(e)


@FUZZ
@given(head=header | st.just(["id", "question", "A", "B", "C", "D", "answer"]),
       rows=st.lists(st.lists(cell, max_size=9), max_size=5))
def test_fuzz_load_split_random_cells(tmp_path_factory, head, rows):
    path = write_csv(tmp_path_factory.mktemp("ceval") / "val" / "s_val.csv", head, rows)
    try:
        questions = load_split(path.parents[1], "s", "val")
    except CevalError as e:
        assert str(path) in str(e)
    else:
        assert questions and all(q.answer in "ABCD" and q.question.strip() for q in questions)


short = st.text(max_size=6)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | short | st.sampled_from(CATEGORIES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short, inner, max_size=4), max_leaves=12)
near_mapping = st.dictionaries(short, st.lists(short | st.sampled_from(CATEGORIES), min_size=3, max_size=3),
                               max_size=3)


@FUZZ
@given(doc=json_value | near_mapping, garbage=st.binary(max_size=40))
def test_fuzz_load_mapping(tmp_path_factory, doc, garbage):
    directory = tmp_path_factory.mktemp("map")
    for content in (json.dumps(doc).encode(), garbage):
        (directory / "subject_mapping.json").write_bytes(content)
        try:
            mapping = load_mapping(directory)
        except CevalError as e:
            assert str(directory / "subject_mapping.json") in str(e)
        else:
            assert mapping and all(info.category in CATEGORIES for info in mapping.values())
