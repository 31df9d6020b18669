"""tp/malloc.py: once set, memory freed by a prefill's intermediates serves the next prefill's without
page faults; turned off, glibc's defaults fault it in again. Each case in a process of its own
(mallopt is process-wide). Linux with glibc, as the project's hosts (/proc/self/maps, getrusage)."""
import os
import subprocess
import sys

from tp import malloc

# A prefill's allocations at the bench model's shapes (512 positions, hidden 2048, MLP 5504, 8 layers):
# intermediates of 4 to 22 MB made and freed every layer.
_CHILD = """
import resource, torch
from tp import malloc
torch.set_num_threads(1)
print("applied", malloc.keep_freed_memory(), malloc.keep_freed_memory())
big = torch.ones(30 << 18)  # 30 MB: from the heap under the raised mmap threshold, else mmapped
heap = next(line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
low, high = (int(a, 16) for a in heap.split("-"))
print("on_heap", low <= big.data_ptr() < high)
del big

def prefill(rows=512, hidden=2048, inter=5504, layers=8):
    x = torch.ones(rows, hidden)
    for _ in range(layers):
        h = x * 0.5
        qkv = torch.ones(rows, 3 * hidden) + h.sum()
        attn = qkv[:, :hidden] * 2
        x = x + attn
        h = x * 0.5
        gate_up = torch.ones(rows, 2 * inter)
        act = gate_up[:, :inter] * gate_up[:, inter:]
        x = x + act[:, :hidden]
        del h, qkv, attn, gate_up, act
    return x

faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    prefill()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print("faults", *faults)
"""


def _run(keep: str) -> tuple[list[str], bool, list[int]]:
    env = {**os.environ, malloc.ENV: keep}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True).stdout
    applied, on_heap, faults = out.splitlines()
    return applied.split()[1:], on_heap.split()[1] == "True", [int(f) for f in faults.split()[1:]]


def test_a_prefills_freed_memory_serves_the_next_without_page_faults():
    applied, on_heap, faults = _run("1")
    assert applied == ["True", "True"], "applied once, then the same answer"
    assert on_heap, "a 30 MB tensor comes from the heap, where freed memory stays"
    # A prefill writes ~660 MB of intermediates, ~160 K pages: after the first, nearly all reuse pages
    # already mapped (glibc's defaults: 0 to 130 K faults a prefill, as its adaptive threshold moves;
    # 25-90 K in the bench model's prefill)
    assert max(faults[1:]) < 8_000, faults
    applied, on_heap, faults = _run("0")
    assert applied == ["False", "False"] and not on_heap, "turned off: glibc's defaults mmap it"
