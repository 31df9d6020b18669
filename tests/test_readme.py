"""The README is for users: its commands on the tiny model run as written, and it stays short.

Every fenced `sh` block of README.md that names `demo/` (the tiny model `make demo` writes) is run, in
order, from the repository root, with this interpreter's bin/ first on PATH (where `make` puts
python and torchrun), each as one bash script that stops at its first failing command."""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def sh_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def tiny_model_blocks() -> list[str]:
    return [block for block in sh_blocks() if "demo/" in block]


def test_readme_is_short_and_names_its_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; depth goes to docs/"
    first = sh_blocks()[0]
    assert "make demo" in first and "make test" in first
    for link in re.findall(r"\]\((docs/[^)]+)\)", README.read_text()):
        assert (ROOT / link).is_file(), f"README links {link}, which does not exist"


def _run(block: str, env: dict) -> subprocess.CompletedProcess:
    # A session of its own: whatever the block leaves running (the server it stops with `kill %1`,
    # still shutting down) is ended with it.
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(block, proc.returncode, out, err)


def test_readme_tiny_model_commands_run_as_written():
    blocks = tiny_model_blocks()
    assert len(blocks) >= 5, "the README shows the tiny model's cut, tasks, server and quantization"
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    shutil.rmtree(ROOT / "demo" / "readme", ignore_errors=True)  # what a block makes must be made now
    outputs = []
    for block in blocks:
        result = _run(block, env)
        assert result.returncode == 0, f"README block failed:\n{block}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
        outputs.append(result.stdout)
    # what the blocks say they make is there
    demo = ROOT / "demo"
    assert (demo / "tiny-internlm-tp2" / "manifest.json").is_file()
    assert len((demo / "readme" / "inference" / "inference.jsonl").read_text().splitlines()) == 2
    assert (demo / "readme" / "precision" / "test_result" / "result_0_classes_acc.json").is_file()
    assert (demo / "readme" / "performance" / "performance_merged.csv").is_file()
    for quantized in ("int8", "int4"):
        assert (demo / "readme" / quantized / "inference.jsonl").is_file()
    served = next(out for block, out in zip(blocks, outputs) if "task=serve" in block)
    assert '"choices"' in served and '"text"' in served, served[-2000:]


@pytest.mark.parametrize("path", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_readme_and_docs_hold_no_history_of_the_work(path):
    text = (ROOT / path).read_text().lower()
    for pattern in (r"\bsessions?\b", r"\brun [0-9]\b", r"\bruns [0-9]-[0-9]\b", r"\bissue [0-9]+", r"\bsince run\b",
                    r"\bearlier code\b", r"\bnot yet written\b"):
        assert not re.search(pattern, text), f"{path}: '{pattern}' speaks of the order of the work"
