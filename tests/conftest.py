import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tp.cpu_kernels import host_isa  # noqa: E402
from tp.demo_data import write_demo_set  # noqa: E402
from tp.tiny import write_tiny_checkpoint  # noqa: E402

HOST_ISA = host_isa()
# The builds of tp/csrc this CPU can run: its own, and the AVX2 one on an AVX-512 host.
RUNNABLE_ISAS = [isa for isa in ("avx2", "avx512") if isa == HOST_ISA or (isa == "avx2" and HOST_ISA == "avx512")]


def cpu_flags() -> set[str]:
    """The host's CPU flags, as /proc/cpuinfo names them."""
    with open("/proc/cpuinfo") as f:
        return next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))

# The real C-Eval where the caller names it (the Makefile does, where ../shared/ceval exists: this
# project's CI layout), else the project's built-in demo set. Every test runs on either; these are the
# subjects each one picks, of the same sizes on both (12 and 16 questions, two categories).
REAL_CEVAL = os.environ.get("INTERNLM_TP_CEVAL_DIR")
if REAL_CEVAL:
    SUBJECTS = ["middle_school_geography", "discrete_mathematics"]
    MULTILINE_SUBJECT = "high_school_biology"  # a dev question spans lines ("\r\n" inside a cell)
    VAL_PER_CATEGORY = {"STEM": 430, "Social Science": 275, "Humanities": 257, "Other": 384}
else:
    SUBJECTS = ["demo_arithmetic", "demo_calendar"]
    MULTILINE_SUBJECT = "demo_arithmetic"
    VAL_PER_CATEGORY = {"STEM": 32, "Social Science": 14, "Humanities": 18, "Other": 16}

# Prompts of different lengths, so a batch is left-padded.
PROMPTS = [
    "以下是中国关于会计考试的单项选择题，请选出其中的正确答案。",
    "你好",
    "中华人民共和国的首都是哪里？",
    "A. 1 B. 2 C. 3 D. 4 答案：",
]


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="where the TP-vs-transformers test runs our model (cuda: as many ranks as GPUs, "
                          "up to 3, NCCL); transformers' reference stays on the CPU in float32")


def pytest_generate_tests(metafunc):
    """`world_size`: 1, 2, 3 ranks on the CPU; on CUDA one per GPU, up to 3 (NCCL takes a GPU a rank)."""
    if "world_size" in metafunc.fixturenames and "tp_device" in metafunc.fixturenames:
        device = metafunc.config.getoption("--device")
        top = 3 if device == "cpu" else min(3, torch.cuda.device_count())
        if top < 1:
            raise pytest.UsageError("--device cuda: no CUDA device here")
        metafunc.parametrize("world_size", list(range(1, top + 1)))


@pytest.fixture
def tp_device(request) -> str:
    return request.config.getoption("--device")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ceval_dir(tmp_path_factory) -> Path:
    if REAL_CEVAL:
        path = Path(REAL_CEVAL)
        assert (path / "subject_mapping.json").is_file(), f"INTERNLM_TP_CEVAL_DIR={path}: no C-Eval data there"
        return path
    return write_demo_set(tmp_path_factory.mktemp("data") / "demo-questions")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The published layout: 3 .bin shards + index, inv_freq buffers, trained tokenizer."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "internlm-tiny")


class FileCreatingPayload:
    """Pickles to a call of open(path, "w"): loading it with plain pickle would create the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def read_full_state(ckpt: Path) -> dict[str, torch.Tensor]:
    index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
    sd = {}
    for file in sorted(set(index["weight_map"].values())):
        sd.update(torch.load(ckpt / file, weights_only=True))
    return sd


def copy_with_index_entry(ckpt: Path, dst: Path, name: str, shard: str) -> Path:
    """A copy of checkpoint `ckpt` whose index also maps tensor `name` (absent from every file) to `shard`."""
    shutil.copytree(ckpt, dst)
    index_path = dst / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][name] = shard
    index_path.write_text(json.dumps(index))
    return dst


TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def torchrun(nproc: int, *overrides: str, timeout: int = 300, multirun: bool = False) -> subprocess.CompletedProcess:
    """launch/run.py through torchrun, as a user runs it; OMP threads 1 per rank (2 cores here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
           str(ROOT / "launch" / "run.py"), *(["-m"] if multirun else []), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


class ScriptedModel(torch.nn.Module):
    """Emits, for row b, the tokens script[b] in order (as one-hot logits), then 7 forever."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.device = torch.device("cpu")

    def setup_cache(self, batch, max_seq):
        from tp.model import DecodeStep
        self.max_seq, self.step = max_seq, DecodeStep.allocate(batch, max_seq)

    def decode(self, step):
        return self.forward(step.tokens[:, None], None, None, 0)

    def forward(self, ids, positions, mask, start):
        logits = torch.zeros(ids.shape[0], 1, self.vocab)
        for b, seq in enumerate(self.script):
            logits[b, 0, seq[self.calls] if self.calls < len(seq) else 7] = 1.0
        self.calls += 1
        return logits
