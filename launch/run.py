"""torchrun --nproc-per-node N launch/run.py task=inference|precision|performance model.path=PATH ...

One process per device. Every rank composes the same Hydra config and holds its own slices; rank 0
alone prints results and writes files into the Hydra run directory.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from launch.session import Session, UserError  # noqa: E402

log = logging.getLogger("internlm_tp")


def _keep_non_zero_ranks_out_of_the_output_dir() -> None:
    """Ranks other than 0 write nothing: no .hydra/ copy, no log file, and (unless the user named the
    directory) a private scratch run dir instead of a second timestamped one next to rank 0's."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        return
    args = sys.argv[1:]
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"internlm-tp-scratch-rank{rank}"
    if not any(a.startswith("hydra.run.dir=") for a in args):
        sys.argv.append(f"hydra.run.dir={scratch}")
    if not any(a.startswith("hydra.sweep.dir=") for a in args):
        sys.argv.append(f"hydra.sweep.dir={scratch}")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        session = Session.get(cfg)
        from launch import tasks
        tasks.run(cfg, session, out_dir)
    except UserError as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    _keep_non_zero_ranks_out_of_the_output_dir()
    try:
        main()
    finally:
        if sys.exc_info()[0] is None:  # a failing rank leaves at once; torchrun ends the others
            Session.close()
