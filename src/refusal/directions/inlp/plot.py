"""The accuracy plot of an INLP component: the train and held-out balanced accuracy of each round's classifier, with
chance and the acceptance threshold, as a PNG.
"""

from __future__ import annotations

from pathlib import Path

from ... import io
from .result import InlpResult


def plot_accuracy(result: InlpResult, pos: int, layer: int, path: str | Path) -> None:
    """PNG of the train and held-out accuracy of each round's classifier at one component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    c = result.index(pos, layer)
    rounds = list(range(1, result.n_iterations + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    ax.plot(rounds, result.train_accuracy[c].numpy(), marker="o", lw=1.4, label="train")
    ax.plot(rounds, result.heldout_accuracy[c].numpy(), marker="s", lw=1.4, label="held out")
    ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance")
    min_acc = result.config.get("min_accuracy")
    if min_acc is not None:
        ax.axhline(min_acc, color="red", ls=":", lw=1, label="min accuracy")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round (directions removed before it = round - 1)")
    ax.set_ylabel("balanced accuracy")
    ax.set_ylim(0.3, 1.02)
    ax.set_title(f"INLP at position {pos}, layer {layer}: rank {int(result.rank[c])}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    io.write_png(Path(path), fig)
