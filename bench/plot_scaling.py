"""Plot tokens/s/GPU and peak memory against sequence length from a ``text_throughput.py --seqs`` result.

python bench/plot_scaling.py bench/results/issue3/h200x2_8b_sp2_sweep.json   # writes the .png beside it

MFU is recomputed from the measured tokens/s by the current rule (``text_throughput.rescored``), like the tables.
"""

from __future__ import annotations

import sys
from pathlib import Path


def plot(result_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from text_throughput import rescored  # beside this file: on sys.path when run as a script

    data = rescored(result_path)
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    seqs = [r["seq"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(seqs, [r["tokens_per_s_per_gpu"] for r in rows], "o-", label="tokens/s/GPU")
    ax1b = ax1.twinx()
    ax1b.plot(seqs, [100 * r["mfu"] for r in rows], "s--", color="tab:orange", label="MFU %")
    ax1.set(xscale="log", xlabel="tokens per sequence", ylabel="tokens/s per GPU", xticks=seqs)
    ax1.set_xticklabels([f"{s // 1024}k" for s in seqs])
    ax1b.set_ylabel("MFU %")
    ax2.plot(seqs, [r["peak_mem_gib"] for r in rows], "o-", color="tab:green")
    ax2.set(xscale="log", xlabel="tokens per sequence", ylabel="peak memory (GiB)", xticks=seqs)
    ax2.set_xticklabels([f"{s // 1024}k" for s in seqs])
    meta = data["meta"]
    fig.suptitle(f"{meta['shape']}, {meta['gpus']}× {meta['device']}, sp={rows[0]['sp']}, AC={rows[0]['ac']}")
    fig.tight_layout()
    out = result_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])))
