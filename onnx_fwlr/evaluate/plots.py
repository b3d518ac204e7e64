"""PNG plots (matplotlib, from the optional `plot` extra): fidelity curves and weighted spectra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnx_fwlr.errors import FwlrError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FwlrError("plots need matplotlib; install it with: pip install 'onnx_fwlr[plot]'") from None
    return plt


def plot_sweep(rows: list[dict], metric: str, path: str | Path) -> Path:
    """Fidelity against kept parameter ratio (and against latency when measured), one line per configuration."""
    plt = _pyplot()
    has_latency = any(r.get("latency_ms") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_latency else 1, figsize=(11 if has_latency else 6, 4.2), squeeze=False)
    for label in sorted({r["config"] for r in rows}):
        mine = sorted((r for r in rows if r["config"] == label), key=lambda r: r["param_ratio"])
        axes[0][0].plot([r["param_ratio"] for r in mine], [r[metric] for r in mine], marker="o", label=label)
        if has_latency:
            axes[0][1].plot([r["latency_ms"] for r in mine], [r[metric] for r in mine], marker="o", label=label)
    axes[0][0].set_xlabel("parameters kept (factorised weights)")
    axes[0][0].set_ylabel(metric.replace("_", " "))
    axes[0][0].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if has_latency:
        axes[0][1].set_xlabel("latency (ms)")
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_spectra(spectra: list[tuple[str, np.ndarray, int | None]], path: str | Path, title: str = "") -> Path:
    """Normalised weighted singular values per site, with the chosen rank marked (dense: no mark)."""
    plt = _pyplot()
    count = len(spectra)
    cols = min(4, count)
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, s, rank) in zip(axes.flat, spectra):
        s = np.asarray(s, dtype=np.float64)
        ax.semilogy(np.arange(1, len(s) + 1), s / max(s[0], 1e-30), lw=1.2)
        if rank is not None:
            ax.axvline(rank, color="tab:red", lw=1, ls="--")
        ax.set_title(f"{name} (rank {'dense' if rank is None else rank})", fontsize=7)
        ax.set_xlabel("component (rank)", fontsize=6)
        ax.set_ylabel("σ / σ₁ (weighted)", fontsize=6)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
