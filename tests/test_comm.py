"""tp.comm: the shared-memory collectives against gloo's, as real processes."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port


def _rank(rank, world, port, out, choice, skip_rank, native):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the C++ copy-wait-sum (tp/csrc/shm_comm.cpp) where the kernels are built; without them
    # (INTERNLM_TP_GEMV=torch here), the same protocol in Python
    os.environ["INTERNLM_TP_GEMV"] = "auto" if native else "torch"
    torch.set_num_threads(1)
    import torch.distributed as dist

    from tp import comm
    from tp.device import init_distributed
    init_distributed("cpu", timeout_s=60, comm_choice=choice)
    c = comm.current()
    g = torch.Generator().manual_seed(rank)
    small = torch.randn(1, 1, 192, generator=g)
    big = torch.randn(1500, 1000, generator=g)  # 6 MB: two pieces through the 4 MB shared-memory slot
    bf16 = torch.randn(3, 64, generator=g).bfloat16()
    result = {"kind": type(c).__name__, "native": getattr(c, "native", None) is not None}
    if rank == skip_rank:  # a peer that never reaches the collective
        dist.barrier()
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        return
    if skip_rank is not None:
        dist.barrier()
        c.timeout_s = 2
        try:
            c.all_reduce(small)
        except RuntimeError as err:
            result["error"] = str(err)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        return
    inputs = {"small": small.clone(), "big": big.clone(), "bf16": bf16.clone()}
    reference = {}
    for name, x in inputs.items():  # the exact sum, from every rank's input in float64
        parts = [torch.empty_like(x, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(parts, x.double())
        reference[name] = torch.stack(parts).sum(0)
    result["all_reduce"] = {n: c.all_reduce(x.clone()) for n, x in inputs.items()}
    result["reference"] = reference
    result["gather"] = c.all_gather(torch.full((2, 3), float(rank)))
    result["big_gather"] = c.all_gather(torch.full((2, 700_000), float(rank)))  # 5.6 MB: in pieces
    result["repeat"] = [c.all_reduce(torch.full((4,), float(rank + i))) for i in range(50)]
    torch.save(result, os.path.join(out, f"{rank}.pt"))


def spawn(world, tmp_path, choice="auto", skip_rank=None, native=True):
    mp.start_processes(_rank, args=(world, free_port(), str(tmp_path), choice, skip_rank, native), nprocs=world,
                       start_method="spawn")
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_collectives_equal_gloo(world, native, tmp_path):
    ranks = spawn(world, tmp_path, native=native)
    assert {r["kind"] for r in ranks} == {"SharedMemoryComm"}
    assert {r["native"] for r in ranks} == {native}
    for r in ranks:
        for name, y in r["all_reduce"].items():
            exact = r["reference"][name]
            # at most the rounding of the result to its dtype (bfloat16: 8 bits of mantissa)
            tol = 2 ** -8 if y.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(y.double(), exact, rtol=tol, atol=1e-6)
            assert torch.equal(y, ranks[0]["all_reduce"][name]), "every rank holds the same bits"
        assert torch.equal(r["gather"], torch.cat([torch.full((2, 3), float(q)) for q in range(world)], dim=-1))
        assert torch.equal(r["big_gather"], torch.cat([torch.full((2, 700_000), float(q)) for q in range(world)], -1))
        expected = [torch.full((4,), float(sum(q + i for q in range(world)))) for i in range(50)]
        assert all(torch.equal(a, b) for a, b in zip(r["repeat"], expected)), "consecutive collectives stay apart"


def test_dist_switch_turns_shared_memory_off(tmp_path):
    ranks = spawn(2, tmp_path, choice="dist")
    assert {r["kind"] for r in ranks} == {"DistComm"}
    torch.testing.assert_close(ranks[0]["all_reduce"]["small"].double(), ranks[0]["reference"]["small"])


@pytest.mark.parametrize("native", [True, False])
def test_missing_peer_is_an_error_naming_it_not_a_hang(native, tmp_path):
    ranks = spawn(2, tmp_path, skip_rank=1, native=native)
    assert ranks[0]["native"] == native
    assert "rank(s) [1] did not reach collective #1 within 2 s" in ranks[0]["error"]


def test_shared_memory_only_where_possible(monkeypatch):
    from tp.comm import shared_memory_possible
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert shared_memory_possible("cpu", 2) == (os.uname().machine in ("x86_64", "AMD64"))
    assert not shared_memory_possible("cuda", 2)
    assert not shared_memory_possible("cpu", 4), "ranks on another host: gloo"
    assert not shared_memory_possible("cpu", 1)
