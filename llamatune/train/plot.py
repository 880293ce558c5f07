"""loss.png: the training and held-out loss curves of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def write_loss_curve(run_dir: Path) -> Path:
    """Draws metrics.jsonl into run_dir/loss.png (matplotlib, no display needed) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never look for a screen
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train, held = {}, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            train[record["step"]] = record["loss"]  # a step logged again after a resume keeps its last value
        if "eval_loss" in record:
            held[record["step"]] = record["eval_loss"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    # few points (a short run, or log_every near max_steps): markers, or a one-point line is drawn invisibly
    ax.plot(list(train), list(train.values()), label="train", linewidth=1,
            marker="o" if len(train) <= 20 else None, markersize=4)
    ax.plot(list(held), list(held.values()), "o-", label="held-out")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path
