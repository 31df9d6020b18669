"""A cut directory (SPEC §2): `manifest.json` + `rank_{r}/` partitions, written by `cut_weights`.

The manifest is written last, so its presence means the cut is complete. Before any compute a rank
checks that the cut was made for this world size and that its own files are all there, whole.
"""
from __future__ import annotations

from pathlib import Path

from tp.checkpoint import CheckpointError
from tp.config import read_json

MANIFEST = "manifest.json"
FORMAT = "internlm-tp-cut"
VERSION = 1


def rank_dir(root: str | Path, rank: int) -> Path:
    return Path(root) / f"rank_{rank}"


def is_cut(root: str | Path) -> bool:
    root = Path(root)
    return (root / MANIFEST).is_file() or rank_dir(root, 0).is_dir()


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{root}: incomplete cut (no {MANIFEST}; the cut did not finish): cut it again")
    manifest = read_json(path, CheckpointError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an internlm-tp cut manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: manifest version {manifest.get('version')!r}, this build reads {VERSION}")
    for key in ("world_size", "ranks", "tensors", "dtype"):
        if key not in manifest:
            raise CheckpointError(f"{path}: manifest lacks {key!r}")
    return manifest


def open_partition(root: str | Path, rank: int, world_size: int) -> tuple[Path, dict]:
    """This rank's partition directory, after checking the cut fits the launch and its files are whole."""
    manifest = read_manifest(root)
    cut_for = manifest["world_size"]
    if cut_for != world_size:
        raise CheckpointError(f"{root}: cut for {cut_for} ranks, launched with {world_size}: "
                              f"launch with --nproc-per-node {cut_for} or cut again with world_size={world_size}")
    directory = rank_dir(root, rank)
    files = manifest["ranks"].get(str(rank), {}).get("files")
    if not files:
        raise CheckpointError(f"{root / MANIFEST}: lists no files for rank {rank}")
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the cut")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says {size} "
                                  f"(truncated or corrupted): cut again")
    config = read_json(directory / "config.json", CheckpointError)
    tp_info = config.get("tensor_parallel", {})
    if tp_info != {"world_size": world_size, "rank": rank}:
        raise CheckpointError(f"{directory / 'config.json'}: tensor_parallel is {tp_info}, "
                              f"expected world_size {world_size}, rank {rank}")
    return directory, manifest


def model_files_dir(root: str | Path, rank: int) -> Path:
    """Where config.json and tokenizer.model are for this rank: its partition, or the checkpoint."""
    return rank_dir(root, rank) if is_cut(root) else Path(root)
