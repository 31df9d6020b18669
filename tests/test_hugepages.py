"""Weights on transparent huge pages (tp/hugepages.py): advised before the first write, they land on
2 MiB pages where the host allows it; switched off, or where THP is off, nothing is advised."""
import mmap

import pytest
import torch

from tp import hugepages


def test_mode_is_read_from_the_bracketed_choice(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "_THP_MODE", mode)
    assert hugepages.thp_mode() == "madvise"
    mode.write_text("always madvise [never]\n")
    assert hugepages.thp_mode() == "never" and not hugepages.enabled()
    assert hugepages.advise([torch.empty(8 << 20, dtype=torch.uint8)]) == 0
    monkeypatch.setattr(hugepages, "_THP_MODE", tmp_path / "absent")
    assert hugepages.thp_mode() is None and not hugepages.enabled()


def test_advised_memory_lands_on_huge_pages():
    # A fresh anonymous mapping, as a large weight usually gets. Not torch.empty: after the earlier
    # tests in this process glibc may serve even 64 MiB from freed heap memory already touched
    # (the CI saw 6 MiB of it on huge pages before the first write); only khugepaged merges that.
    mapping = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not shmem
    block = torch.frombuffer(mapping, dtype=torch.uint8)
    advised = hugepages.advise([block, block[1:]])  # the same storage twice: advised once
    assert hugepages.huge_bytes([block]) == 0, "nothing is there before the first write"
    block.fill_(1)
    if hugepages.enabled():
        assert 62 << 20 <= advised <= 64 << 20  # the whole 2 MiB pages inside 64 MiB
        assert hugepages.huge_bytes([block]) >= 2 << 20
    else:
        assert advised == 0
    assert int(block.sum()) == 64 << 20  # the memory itself is untouched by the advice
    del block
    mapping.close()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(hugepages.ENV, "0")
    assert hugepages.advise([torch.empty(8 << 20, dtype=torch.uint8)]) == 0
    monkeypatch.setenv(hugepages.ENV, "yes")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        hugepages.enabled()
