"""Accuracy-vs-GFLOPs plot of every net's depths (a PNG artifact)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def plot_accuracy_vs_flops(
    curves: Mapping[str, Mapping[float, tuple[float, float]]], path: str | Path, title: str = ""
) -> Path:
    """``curves[net][s] = (gflops, top1 %)`` -> a line per net, each point labelled with s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for net, points in curves.items():
        factors = sorted(points)
        xs = [points[s][0] for s in factors]
        ys = [points[s][1] for s in factors]
        ax.plot(xs, ys, marker="o", label=net)
        for s, x, y in zip(factors, xs, ys):
            ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlabel("GFLOPs per image (forward)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs compute per depth")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
