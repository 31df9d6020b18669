"""What a launcher process sets up once and reuses for every job of a Hydra sweep: the process
group, and the loaded model for a given (path, dtype)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from tp import comm
from tp.checkpoint import CheckpointError
from tp.config import ConfigError
from tp.device import DeviceError, Dist, cpu_threads, init_distributed
from tp.load import load_model
from tp.model import InternLM
from tp.partition import model_files_dir
from tp.tokenizer import Tokenizer

log = logging.getLogger("internlm_tp")


class UserError(Exception):
    """A problem with the user's input or environment: reported as one line, exit code 2."""


# Errors from the library that are the user's to fix, not bugs.
USER_ERRORS = (ConfigError, CheckpointError, DeviceError, FileNotFoundError, ValueError)


@dataclass
class Session:
    dist: Dist
    models: dict = field(default_factory=dict)

    _current: ClassVar["Session | None"] = None  # one per process, shared by the jobs of a sweep

    @classmethod
    def get(cls, cfg: DictConfig) -> "Session":
        if cls._current is None:
            try:
                d = init_distributed(cfg.device, float(cfg.dist_timeout_s), comm_choice=str(cfg.comm))
                if d.kind == "cpu":
                    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
                    torch.set_num_threads(cpu_threads(cfg.get("threads", "auto"), local))
            except USER_ERRORS as err:
                raise UserError(str(err)) from err
            log.info("rank %d/%d on %s (pid %d, %d threads, collectives: %s)", d.rank, d.world_size, d.device,
                     os.getpid(), torch.get_num_threads(), type(comm.current()).__name__ if d.world_size > 1 else "none")
            cls._current = cls(d)
        return cls._current

    @classmethod
    def close(cls) -> None:
        """Leave the process group together: a rank that exits while another still talks to the
        rendezvous store (hosted by one node) makes that one fail at its own exit."""
        if cls._current is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        cls._current = None

    def model(self, path: str, dtype: str, quantize: str = "auto", quantize_lm_head: bool = True,
              quantize_embedding: bool = True, graphs: str = "auto", group_size: int = 128) -> tuple[InternLM, Tokenizer]:
        key = (path, dtype, quantize, quantize_lm_head, quantize_embedding, graphs, group_size)
        if key not in self.models:
            self.models.clear()  # one model resident at a time
            try:
                files = model_files_dir(path, self.dist.rank)
                # The tokenizer before any weight is read; a missing directory, config or a cut for another
                # world size is load_model's to name.
                tokenizer = Tokenizer(files) if (Path(files) / "config.json").is_file() else None
                model = load_model(path, self.dist.rank, self.dist.world_size, self.dist.device, dtype,
                                   quantize, quantize_lm_head, quantize_embedding, graphs, group_size)
                tokenizer = tokenizer or Tokenizer(files)
            except USER_ERRORS as err:
                raise UserError(str(err)) from err
            if dist.is_initialized() and self.dist.world_size > 1:
                dist.barrier()  # every rank loaded: HCCL/NCCL build their communicator now, not mid-step
            log.info("loaded %s: %d layers, %s activations, %s weights, rank-local weights %.1f MB", path,
                     model.cfg.num_hidden_layers, model.dtype, model.quantize, model.weight_bytes() / 1e6)
            self.models[key] = (model, tokenizer)
        return self.models[key]

    def model_for(self, cfg) -> tuple[InternLM, Tokenizer]:
        """The model the composed config names (`model.path`, `dtype`, `model.quantize`, `graphs`)."""
        if OmegaConf.is_missing(cfg.model, "path") or not cfg.model.get("path"):
            raise UserError("model.path is required: a published checkpoint directory or a cut "
                            "(e.g. model.path=/data/internlm-7b)")
        return self.model(str(cfg.model.path), str(cfg.dtype), str(cfg.model.get("quantize", "auto")),
                          bool(cfg.model.get("quantize_lm_head", True)),
                          bool(cfg.model.get("quantize_embedding", True)), str(cfg.get("graphs", "auto")),
                          int(cfg.model.get("group_size", 128)))

    def generator(self, seed: int) -> torch.Generator:
        """On the rank's device, so sampling stays there; the same seed on every rank."""
        return torch.Generator(device=self.dist.device).manual_seed(int(seed))
