"""task=precision and task=performance through torchrun on 2 processes; bad input through the app."""
import csv
import json
import shutil

import pytest
from hydra import compose, initialize_config_dir

from conftest import ROOT, SUBJECTS, torchrun
from cut_weights import CutOptions, cut
from launch.callbacks import MERGED_CSV, PLOT
from launch.performance import COLUMNS, model_label
from launch.session import Session, UserError
from launch.tasks import run as run_task
from launch.precision import encode_prompt
from tp import ceval
from tp.tokenizer import Tokenizer

SUBJECT_ARG = "task.subjects=[" + ",".join(SUBJECTS) + "]"


def read_cache(run_dir):
    with open(run_dir / "test_result" / "cache0.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cut2(tiny_ckpt, tmp_path_factory):
    return cut(CutOptions(str(tiny_ckpt), str(tmp_path_factory.mktemp("c") / "tp2"), 2, progress=False))


@pytest.fixture(scope="module")
def precision_tp2(cut2, ceval_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("precision") / "tp2"
    proc = torchrun(2, "task=precision", f"model.path={cut2}", SUBJECT_ARG, "task.batch_size=4",
                    f"task.data_dir={ceval_dir}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir, proc


def test_precision_cache_and_accuracies(precision_tp2, ceval_dir, tiny_ckpt):
    run_dir, proc = precision_tp2
    rows = read_cache(run_dir)
    files = {s: ceval.load_split(ceval_dir, s, "val") for s in SUBJECTS}
    assert [r["subject"] for r in rows] == [s for s in SUBJECTS for _ in files[s]], "subject by subject"
    tok, mapping = Tokenizer(tiny_ckpt), ceval.load_mapping(ceval_dir)
    for s in SUBJECTS:
        ids = [r["id"] for r in rows if r["subject"] == s]
        assert sorted(ids) == sorted(q.id for q in files[s]) and len(set(ids)) == len(ids), "each question once"
        by_id, shots = {q.id: q for q in files[s]}, ceval.load_split(ceval_dir, s, "dev")
        lengths = [len(encode_prompt(tok, "official", mapping, shots, by_id[i], 2048)[0]) for i in ids]
        assert lengths == sorted(lengths), "shortest prompt first within a subject (little left padding)"
    assert list(rows[0]) == ["subject", "id", "answer", "prediction", "correct"]
    assert all(r["prediction"] in "ABCD" for r in rows)
    assert all((r["prediction"] == r["answer"]) == (r["correct"] in ("1", "True")) for r in rows)
    subject_acc = json.loads((run_dir / "test_result" / "result_0_subject_acc.json").read_text())
    for s in SUBJECTS:
        mine = [r for r in rows if r["subject"] == s]
        assert subject_acc[s] == pytest.approx(sum(r["prediction"] == r["answer"] for r in mine) / len(mine))
    classes = json.loads((run_dir / "test_result" / "result_0_classes_acc.json").read_text())
    correct = sum(r["prediction"] == r["answer"] for r in rows)
    assert classes["Avg acc"] == pytest.approx(correct / len(rows))
    assert classes["Subject avg"] == pytest.approx(sum(subject_acc.values()) / len(SUBJECTS))
    mapping = ceval.load_mapping(ceval_dir)
    for category in {mapping[s].category for s in SUBJECTS}:
        mine = [r for r in rows if mapping[r["subject"]].category == category]
        assert classes[category] == pytest.approx(sum(r["prediction"] == r["answer"] for r in mine) / len(mine))
    assert "Avg acc" in proc.stdout and proc.stdout.count("Avg acc") == 1, "table printed once, by rank 0"


def test_tp2_predictions_equal_tp1(precision_tp2, tiny_ckpt, ceval_dir, tmp_path):
    run_dir, _ = precision_tp2
    proc = torchrun(1, "task=precision", f"model.path={tiny_ckpt}", SUBJECT_ARG, "task.batch_size=3",
                    f"task.data_dir={ceval_dir}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["prediction"] for r in read_cache(tmp_path)] == [r["prediction"] for r in read_cache(run_dir)]


def test_resumed_run_equals_uninterrupted(precision_tp2, cut2, ceval_dir, tmp_path):
    run_dir, _ = precision_tp2
    full = (run_dir / "test_result" / "cache0.csv").read_bytes()
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir / "test_result", resumed / "test_result")
    lines = full.splitlines(keepends=True)
    # 10 answered questions, then half a line: what a SIGKILL during a write leaves
    (resumed / "test_result" / "cache0.csv").write_bytes(b"".join(lines[:11]) + lines[11][:7])
    proc = torchrun(2, "task=precision", f"model.path={cut2}", SUBJECT_ARG, "task.batch_size=4",
                    f"task.data_dir={ceval_dir}", f"hydra.run.dir={resumed}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming: 10 answered questions read from the cache, 18 to ask" in proc.stdout + proc.stderr
    assert (resumed / "test_result" / "cache0.csv").read_bytes() == full
    for name in ("result_0_subject_acc.json", "result_0_classes_acc.json"):
        assert (resumed / "test_result" / name).read_text() == (run_dir / "test_result" / name).read_text()


def test_atb_protocol_and_protocol_change_refused(cut2, ceval_dir, tmp_path):
    args = [f"model.path={cut2}", "task=precision", f"task.subjects=[{SUBJECTS[0]}]", "task.shots=1",
            "task.batch_size=4", f"task.data_dir={ceval_dir}", f"hydra.run.dir={tmp_path}"]
    proc = torchrun(2, *args, "task.protocol=atb")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_cache(tmp_path)
    # the first ASCII letter of a 32-token generation, upper-cased; -1 when there is none
    assert len(rows) == 12 and all(r["prediction"] == "-1" or (len(r["prediction"]) == 1 and "A" <= r["prediction"] <= "Z")
                                   for r in rows)
    proc = torchrun(2, *args, "task.protocol=official")
    assert proc.returncode != 0
    assert "protocol" in proc.stdout and "atb" in proc.stdout
    assert len(read_cache(tmp_path)) == 12, "nothing mixed into the other protocol's cache"


def test_performance_sweep_merges_csv_and_plots(cut2, tmp_path):
    proc = torchrun(2, "task=performance", f"model.path={cut2}", "task.batch_size=1,2", "task.input_len=8",
                    "task.output_len=[4,6]", f"hydra.sweep.dir={tmp_path}", multirun=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / MERGED_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["job", *COLUMNS]
    assert [(r["batch_size"], r["output_seq_len(Decoding)"]) for r in rows] == [("1", "4"), ("1", "6"), ("2", "4"), ("2", "6")]
    for r in rows:
        assert float(r["ResponseTime(s)"]) > 0 and float(r["forward_next_token_time(ms)"]) > 0
        assert float(r["tokens_per_s"]) == pytest.approx(
            int(r["batch_size"]) * int(r["output_seq_len(Decoding)"]) / float(r["ResponseTime(s)"]), rel=1e-3)
    assert (tmp_path / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for job in ("0", "1"):
        assert (tmp_path / job / f"performance_test_cpu_{cut2.name}.csv").is_file(), "named after the checkpoint"


def test_performance_csv_named_after_the_model_config_or_the_checkpoint():
    cfg = compose_cfg("model.path=/data/internlm-7b-tp2")
    assert model_label(cfg, ["model.path=/data/internlm-7b-tp2"]) == "internlm-7b-tp2"
    cfg = compose_cfg("model=internlm_7b", "model.path=/data/cut")
    assert model_label(cfg, ["model=internlm_7b", "model.path=/data/cut"]) == "internlm_7b"


# -- bad input, through the task code with a composed config (one process) ------------------------
def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def session(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(Session, "_current", None)
    return Session.get(compose_cfg("device=cpu"))


def broken_ceval(ceval_dir, tmp_path, subject, edit):
    data = tmp_path / "ceval"
    shutil.copytree(ceval_dir, data)
    path = data / "val" / f"{subject}_val.csv"
    path.chmod(0o644)
    path.write_text(edit(path.read_text(encoding="utf-8-sig")), encoding="utf-8")
    return data


@pytest.mark.parametrize("case", ["data_dir_missing", "unknown_subject", "missing_column", "bad_answer",
                                  "batch_size_zero", "unknown_protocol"])
def test_precision_bad_input_is_a_clear_error(case, tiny_ckpt, ceval_dir, tmp_path, session):
    geo = SUBJECTS[0]
    overrides = ["task=precision", f"model.path={tiny_ckpt}", f"task.data_dir={ceval_dir}", f"task.subjects=[{geo}]"]
    override, message = {
        "data_dir_missing": lambda: (f"task.data_dir={tmp_path / 'nowhere'}", "nowhere"),
        "unknown_subject": lambda: (f"task.subjects=[{geo}x]", f"{geo}x"),
        "missing_column": lambda: (
            f"task.data_dir={broken_ceval(ceval_dir, tmp_path, geo, lambda t: t.replace(',answer', ',answr', 1))}",
            "answer"),
        "bad_answer": lambda: (
            f"task.data_dir={broken_ceval(ceval_dir, tmp_path, geo, lambda t: t.rstrip()[:-1] + 'E')}", "'E'"),
        "batch_size_zero": lambda: ("task.batch_size=0", "task.batch_size must be an integer >= 1, got 0"),
        "unknown_protocol": lambda: ("task.protocol=mmlu", "task.protocol='mmlu': expected official or atb"),
    }[case]()
    cfg = compose_cfg(*overrides, override)
    with pytest.raises(UserError, match=message) as err:
        run_task(cfg, session, tmp_path)
    if case in ("missing_column", "bad_answer"):
        assert f"{geo}_val.csv" in str(err.value), "the message names the file"


def test_inference_prompt_longer_than_context_refused(tiny_ckpt, tmp_path, session):
    cfg = compose_cfg(f"model.path={tiny_ckpt}", "task.prompts=" + json.dumps(["长" * 2100], ensure_ascii=False), "task.max_new_tokens=4")
    with pytest.raises(UserError, match=r"prompt of \d+ tokens \+ task.max_new_tokens=4 exceeds the model's context of 2048"):
        run_task(cfg, session, tmp_path)


def test_unknown_task_is_a_clear_error(tiny_ckpt, tmp_path):
    proc = torchrun(1, "task=translate", f"model.path={tiny_ckpt}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "task/translate" in proc.stdout + proc.stderr and "Available options" in proc.stdout + proc.stderr


def test_one_subject_as_a_plain_string(tiny_ckpt, ceval_dir, tmp_path, session):
    cfg = compose_cfg("task=precision", f"model.path={tiny_ckpt}", f"task.data_dir={ceval_dir}",
                      f"task.subjects={SUBJECTS[0]}", "task.shots=0", "task.batch_size=12")
    run_task(cfg, session, tmp_path)
    assert [r["subject"] for r in read_cache(tmp_path)] == [SUBJECTS[0]] * 12


def test_missing_model_path_is_a_clear_error(tmp_path, session):
    cfg = compose_cfg("model=internlm_7b")
    with pytest.raises(UserError, match="model.path is required"):
        run_task(cfg, session, tmp_path)
