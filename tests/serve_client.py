"""A task=serve server started through torchrun as a user starts it, for the tests that drive it."""
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import ROOT, TORCHRUN, free_port

CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class Server:
    def __init__(self, ckpt: Path, ranks: int, run_dir: Path, *overrides: str, rows: int = 8, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = open(run_dir.parent / f"{run_dir.name}.log", "w+")
        self.proc = subprocess.Popen(
            [TORCHRUN, "--nproc-per-node", str(ranks), "--master-port", str(free_port()), str(ROOT / "launch" / "run.py"),
             "task=serve", f"model.path={ckpt}", f"task.port={self.port}", f"task.max_batch={rows}",
             f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if urllib.request.urlopen(self.base + "/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("the server did not come up:\n" + self.output())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, **kwargs):
        from openai import OpenAI
        return OpenAI(base_url=self.base + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def rank_pids(self) -> list[int]:
        """The ranks' pids, by rank, from their start-up lines."""
        found = dict(re.findall(r"\] rank (\d+)/\d+ on \w+ \(pid (\d+)", self.output()))
        return [int(found[r]) for r in sorted(found, key=int)]

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(self.base + "/metrics", timeout=5).read().decode()
        return float(next(l for l in text.splitlines() if l.startswith(f"internlm_tp:{name} ")).split()[1])

    def running(self) -> int:
        return int(self.metric("num_requests_running"))

    def health(self) -> int:
        try:
            return urllib.request.urlopen(self.base + "/health", timeout=5).status
        except urllib.error.HTTPError as err:
            return err.code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
