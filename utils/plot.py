"""Plot helpers. Each returns ``(fig, axes)`` and never calls ``plt.show()``: the notebook decides."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from .energy import EnergySummary


# The widest a figure is drawn, in inches: the book's content column is about 750 px wide, and at
# matplotlib's 100 dpi a wider figure would be shown scaled down, its text with it.
MAX_WIDTH = 7.5


def _fit(size: float, ncols: int) -> float:
    """The panel size that keeps ``ncols`` panels within :data:`MAX_WIDTH`."""
    return min(size, MAX_WIDTH / max(ncols, 1))


def _img(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().float()
    if t.dim() == 3:
        t = t[0] if t.shape[0] == 1 else t.permute(1, 2, 0)
    return t.numpy()


def show_images(
    x: torch.Tensor,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 8,
    size: float = 1.4,
    cmap: str = "gray",
    vmin: float = 0.0,
    vmax: float = 1.0,
    suptitle: str | None = None,
):
    """A grid of images ``x: [N, C, H, W]`` with optional per-image titles."""
    n = len(x)
    if n == 0:
        raise ValueError("show_images needs at least one image")
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    size = _fit(size, ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_img(x[i]), cmap=cmap, vmin=vmin, vmax=vmax)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig, axes


def show_perturbations(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    pred_clean: Sequence[int],
    pred_adv: Sequence[int],
    *,
    labels: Sequence[int] | None = None,
    row_names: tuple[str, str, str] = ("clean", "perturbation", "perturbed"),
    size: float = 1.5,
    suptitle: str | None = None,
):
    """Three rows: clean inputs, the perturbation ``x_adv - x`` (scaled to be visible, grey = 0),
    and the perturbed inputs, each titled with the model's prediction (and the label if given)."""
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv must have the same shape, got {tuple(x.shape)} and {tuple(x_adv.shape)}")
    n = len(x)
    delta = (x_adv - x).detach().cpu()
    scale = float(delta.abs().max()) or 1.0
    size = _fit(size, n)
    fig, axes = plt.subplots(3, n, figsize=(size * n, size * 3 + 0.3), squeeze=False)
    for i in range(n):
        truth = "" if labels is None else f" (y={int(labels[i])})"
        axes[0, i].imshow(_img(x[i]), cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"pred {int(pred_clean[i])}{truth}", fontsize=8)
        axes[1, i].imshow(_img(delta[i]), cmap="RdBu_r", vmin=-scale, vmax=scale)
        axes[1, i].set_title(f"max |δ|={float(delta[i].abs().max()):.2f}", fontsize=8)
        changed = int(pred_adv[i]) != int(pred_clean[i])
        axes[2, i].imshow(_img(x_adv[i]), cmap="gray", vmin=0, vmax=1)
        axes[2, i].set_title(f"pred {int(pred_adv[i])}", fontsize=8, color="crimson" if changed else "black")
    for r, name in enumerate(row_names):
        axes[r, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig, axes


def plot_confusion(cm: torch.Tensor, *, title: str = "", ax=None):
    """A confusion matrix (rows: true class, columns: predicted), counts written in the cells."""
    cm = torch.as_tensor(cm).cpu().numpy()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(cm, cmap="Blues")
    k = cm.shape[0]
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig, ax


def plot_history(history, *, title: str = ""):
    """Training loss and train/test accuracy per epoch of a :class:`utils.train.History`."""
    epochs = history.column("epoch")
    fig, axes = plt.subplots(1, 2, figsize=(MAX_WIDTH, 3.0))
    axes[0].plot(epochs, history.column("train_loss"), marker="o", label="train")
    test_loss = history.column("test_loss")
    if any(v is not None for v in test_loss):
        axes[0].plot(epochs, test_loss, marker="o", label="test")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    axes[1].plot(epochs, [100 * a for a in history.column("train_acc")], marker="o", label="train")
    test_acc = history.column("test_acc")
    if any(v is not None for v in test_acc):
        axes[1].plot(epochs, [100 * a for a in test_acc], marker="o", label="test")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, axes


def plot_curves(
    x: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    ax=None,
    percent: bool = False,
):
    """Several named curves over a shared x axis (accuracy against ε, loss against steps, ...)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.6))
    for name, ys in curves.items():
        ys = np.asarray(ys, dtype=float) * (100 if percent else 1)
        ax.plot(x, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig, ax


def plot_histograms(
    groups: Mapping[str, torch.Tensor | Sequence[float]],
    *,
    xlabel: str,
    bins: int = 40,
    title: str = "",
    ax=None,
):
    """Overlaid, density-normalised histograms of named groups of values (energies of clean vs noisy inputs, ...)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.6))
    arrays = {k: np.asarray(torch.as_tensor(v).detach().cpu().float()) for k, v in groups.items()}
    lo = min(a.min() for a in arrays.values())
    hi = max(a.max() for a in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    for name, a in arrays.items():
        ax.hist(a, bins=edges, density=True, alpha=0.45, label=f"{name} (mean {a.mean():.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig, ax


def plot_logit_summary(summary: EnergySummary, *, class_names: Sequence[str] | None = None):
    """Bars of the logits and of the softmax probabilities of one logit vector, with its energy."""
    k = len(summary.logits)
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    fig, axes = plt.subplots(1, 2, figsize=(MAX_WIDTH, 3))
    colors = ["tab:orange" if i == summary.prediction else "tab:blue" for i in range(k)]
    axes[0].bar(names, summary.logits, color=colors)
    axes[0].axhline(-summary.energy, color="k", ls="--", lw=1, label=f"-E = {-summary.energy:.3f}")
    axes[0].axhline(summary.max_logit, color="tab:orange", ls=":", lw=1, label=f"max logit = {summary.max_logit:.3f}")
    axes[0].set_title("logits f(x)")
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    axes[1].bar(names, summary.probs, color=colors)
    axes[1].set_ylim(0, 1)
    axes[1].set_title(f"softmax at T={summary.T:g}; confidence {summary.confidence:.3f}")
    fig.suptitle(f"E(x) = -T·logsumexp(f(x)/T) = {summary.energy:.4f}")
    fig.tight_layout()
    return fig, axes
