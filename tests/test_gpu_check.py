"""bench/gpu_check.sh as the lent GPU machine runs it, on the CPU (--smoke): its missing packages built as
wheels here by bench/gpu_wheels.sh (hydra-core and omegaconf downloaded for Python 3.12, antlr4 4.9.3
built from its sdist), installed into a fresh --target directory with no index, every step passing;
without the wheels it refuses in one line. Needs the package registry (the wheels are downloaded)."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_runs_from_its_wheels_and_refuses_without_them(tmp_path):
    wheels = tmp_path / "whl"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", "bench/gpu_wheels.sh", str(wheels)], cwd=ROOT, env=env, check=True, timeout=300,
                   capture_output=True)
    assert sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")) == \
        ["antlr4_python3_runtime", "hydra_core", "omegaconf"]
    refused = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                             env={**env, "WHEELS": str(tmp_path / "none"), "OUT": str(tmp_path / "out0")}, timeout=60)
    assert refused.returncode == 2 and "lacks the hydra-core, omegaconf or antlr4 wheel" in refused.stderr
    assert refused.stdout == "" and len(refused.stderr.strip().splitlines()) == 1
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "WHEELS": str(wheels), "OUT": str(tmp_path / "out")}, timeout=480)
    assert run.returncode == 0, run.stdout + run.stderr
    passed = re.findall(r"^PASS (\w+)", run.stdout, re.M)
    assert passed == ["equivalence", "inference", "precision", "performance", "bench"], run.stdout
    imported = re.search(r"^hydra \S+ from (\S+)", run.stdout, re.M).group(1)
    assert not imported.startswith(sys.prefix), f"hydra came from the venv ({imported}), not the wheels"
    assert (tmp_path / "out" / "bench.json").is_file()
