"""Figures of `mlfd eval --plots`: t-SNE maps of features side by side, and confusion
matrices; written atomically into reports/ and linked from results.md.

Only drawing lives here (numpy in, PNG out): mlfd.stages.embeddings measures the models.
scikit-learn (the ``plots`` extra) provides PCA and t-SNE.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .errors import MlfdError
from .storage.diskio import write_atomic, write_text

DPI = 100
PANEL_IN = 4.5  # one map: a square of this many inches (+ TITLE_IN for the titles)
TITLE_IN = 0.8
LEGEND_IN = 2.2  # the class legend right of the maps
LEGEND_MAX = 30  # class names listed at most (then "... N more")
PCA_DIMS = 50  # t-SNE runs on the first 50 principal components (its usual preprocessing)
TSNE_ITERS = 500  # sklearn's minimum is 250, all of them early exaggeration


def require() -> None:
    """--plots needs scikit-learn: one line saying how to get it, before any work."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise MlfdError("--plots needs scikit-learn: pip install 'mlfd[plots]'") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def project(features: np.ndarray, seed: int, max_iter: int = TSNE_ITERS) -> np.ndarray:
    """(n, 2) t-SNE coordinates of ``features`` (n, D): PCA to PCA_DIMS dimensions, then
    scikit-learn's Barnes-Hut t-SNE with PCA initialisation, the same for the same seed."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    n = len(x)
    if n < 4 or not np.isfinite(x).all() or np.ptp(x, axis=0).max(initial=0) == 0:
        return np.zeros((n, 2))  # nothing t-SNE can spread out (a constant model's features)
    # One thread: the same map whatever the machine's core count (OpenMP reductions sum
    # in a per-thread order), and on a busy 2-core machine it was also 4x faster.
    with threadpool_limits(1):
        if x.shape[1] > PCA_DIMS and n > PCA_DIMS:
            x = PCA(PCA_DIMS, svd_solver="full", random_state=seed).fit_transform(x)
        tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", learning_rate="auto",
                    max_iter=max_iter, random_state=seed)
        return tsne.fit_transform(x)


def _colors(num_classes: int) -> np.ndarray:
    plt = _pyplot()
    if num_classes <= 10:
        return plt.get_cmap("tab10")(np.arange(num_classes))
    if num_classes <= 20:
        return plt.get_cmap("tab20")(np.arange(num_classes))
    return plt.get_cmap("turbo")(np.linspace(0, 1, num_classes))


def embedding_size(panels: int) -> tuple[int, int]:
    """The PNG's (width, height) in pixels for ``panels`` maps."""
    return round((PANEL_IN * panels + LEGEND_IN) * DPI), round((PANEL_IN + TITLE_IN) * DPI)


def _save(fig, path: Path) -> None:
    # no "Software" entry: the same figure gives the same bytes with any matplotlib
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI,
                                               metadata={"Software": None}))


def plot_embeddings(path: Path, dataset: str, classes: list[str],
                    panels: list[tuple[str, np.ndarray, np.ndarray]], seed: int,
                    note: str = "") -> list[np.ndarray]:
    """One map per (title, features (n, D), labels (n,)), side by side, coloured by class
    with the class names in a legend; ``note`` (models not drawn) joins the title. Returns
    the 2-D coordinates drawn, per panel."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    colors = _colors(len(classes))
    w, h = embedding_size(len(panels))
    fig = plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    right = 1 - LEGEND_IN * DPI / w
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    fig.subplots_adjust(left=0.01, right=right - 0.01, bottom=0.02,
                        top=1 - TITLE_IN * DPI / h, wspace=0.04)
    coords = []
    for ax, (title, feats, labels) in zip(axes, panels):
        xy = project(feats, seed)
        coords.append(xy)
        size = float(np.clip(3000 / max(1, len(xy)), 3, 16))  # fewer points, bigger dots
        ax.scatter(xy[:, 0], xy[:, 1], c=colors[np.asarray(labels)], s=size, linewidths=0)
        ax.set_title(f"{title}\n{feats.shape[1]}-d features, {len(feats)} points", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    title = f"{dataset}: test-split features, t-SNE (seed {seed})"
    fig.suptitle(title + (f" — {note}" if note else ""), fontsize=10)
    shown = min(len(classes), LEGEND_MAX)
    handles = [Line2D([], [], marker="o", linestyle="", markersize=5, color=colors[c])
               for c in range(shown)]
    names = [str(n) for n in classes[:shown]]
    if len(classes) > shown:
        handles.append(Line2D([], [], linestyle=""))
        names.append(f"... {len(classes) - shown} more")
    fig.legend(handles, names, title="class", loc="center left", bbox_to_anchor=(right, 0.5),
               fontsize=8 if len(names) <= 15 else 6, frameon=False,
               ncol=1 if len(names) <= 20 else 2)
    _save(fig, path)
    plt.close(fig)
    return coords


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, row: true class, column: predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def confusion_size(panels: int, num_classes: int) -> tuple[int, int]:
    """The PNG's (width, height) in pixels: a square per matrix, growing with the classes."""
    side = max(4.5, min(12.0, 0.22 * num_classes + 2.5))
    return round((side * panels + 0.8) * DPI), round((side + TITLE_IN) * DPI)


def plot_confusions(path: Path, dataset: str, classes: list[str],
                    mats: list[tuple[str, np.ndarray]]) -> None:
    """Row-normalised confusion matrices (title, counts) side by side."""
    plt = _pyplot()
    c = len(classes)
    w, h = confusion_size(len(mats), c)
    fig = plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    ticks = np.arange(c) if c <= 40 else np.arange(0, c, int(np.ceil(c / 40)))
    fontsize = 8 if c <= 15 else 5
    image = None
    for ax, (title, counts) in zip(axes, mats):
        counts = np.asarray(counts)
        rows = counts.sum(1, keepdims=True)
        norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
        image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        acc = np.trace(counts) / max(1, counts.sum())
        ax.set_title(f"{title}\ntop-1 {100 * acc:.2f} % of {counts.sum()}", fontsize=9)
        ax.set_xticks(ticks, [str(classes[i]) for i in ticks], rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, [str(classes[i]) for i in ticks], fontsize=fontsize)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        if c <= 12:  # the shares themselves, where they fit
            for i in range(c):
                for j in range(c):
                    if counts[i, j]:
                        ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center",
                                fontsize=6, color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class")
    fig.suptitle(f"{dataset}: confusion on the test split (rows normalised)", fontsize=10)
    _save(fig, path)
    plt.close(fig)


FIGURES_HEADING = "## Figures"


def link_figures(markdown: Path, figures: dict[str, list[Path]]) -> None:
    """Append (or replace) a Figures section in ``markdown`` with the images per dataset,
    linked relative to it."""
    text = markdown.read_text() if markdown.exists() else ""
    text = re.split(rf"(?m)^{re.escape(FIGURES_HEADING)}$", text)[0].rstrip("\n")
    lines = [text, "", FIGURES_HEADING, ""] if text else [FIGURES_HEADING, ""]
    for name, paths in figures.items():
        lines += [f"### {name}", ""]
        for p in paths:
            what = "embeddings" if p.name.startswith("embeddings-") else "confusion matrices"
            lines.append(f"![{what} of {name}]({os.path.relpath(p, markdown.parent)})")
        lines.append("")
    write_text(markdown, "\n".join(lines))
