"""Hydra callbacks. After a `-m` sweep of task=performance, rank 0 merges the jobs' CSVs into one
and plots tokens/s and next-token latency against batch size, in the sweep directory."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("internlm_tp")

MERGED_CSV = "performance_merged.csv"
PLOT = "performance.png"


def merge_csvs(files: list[Path], out: Path) -> list[dict]:
    rows, columns = [], None
    for file in files:
        with open(file, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = columns or ["job", *reader.fieldnames]
            rows += [{"job": file.parent.name, **row} for row in reader]
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display on the nodes this runs on
    import matplotlib.pyplot as plt

    series: dict[tuple[int, int], list[tuple[int, float, float]]] = {}
    for r in rows:
        key = (int(r["input_seq_len(Encoding)"]), int(r["output_seq_len(Decoding)"]))
        series.setdefault(key, []).append((int(r["batch_size"]), float(r["tokens_per_s"]),
                                           float(r["forward_next_token_time(ms)"])))
    fig, (ax_tps, ax_ms) = plt.subplots(1, 2, figsize=(11, 4))
    for (n_in, n_out), points in sorted(series.items()):
        points.sort()
        label = f"in {n_in}, out {n_out}"
        ax_tps.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax_ms.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    ax_tps.set(xlabel="batch size", ylabel="tokens/s", title="throughput")
    ax_ms.set(xlabel="batch size", ylabel="ms", title="next-token latency")
    for ax in (ax_tps, ax_ms):
        ax.set_xticks(sorted({int(r["batch_size"]) for r in rows}))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class MergePerformance(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        files = sorted(sweep_dir.glob("*/performance_test_*.csv"), key=lambda p: (len(p.parent.name), p.parent.name))
        if not files:
            return
        rows = merge_csvs(files, sweep_dir / MERGED_CSV)
        plot(rows, sweep_dir / PLOT)
        log.info("merged %d performance CSVs into %s and %s", len(files), sweep_dir / MERGED_CSV, sweep_dir / PLOT)
