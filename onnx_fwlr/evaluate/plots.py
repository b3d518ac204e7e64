"""PNG plots (matplotlib, from the optional `plot` extra): fidelity curves and weighted spectra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnx_fwlr.errors import FwlrError


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FwlrError("plots need matplotlib; install it with: pip install 'onnx_fwlr[plot]'") from None
    return plt


def plot_sweep(rows: list[dict], metric: str, path: str | Path) -> Path:
    """Fidelity against bytes (and against latency when measured): one line per configuration over its budgets,
    ONNX Runtime's baselines as single squares, Pareto points ringed, the original as reference lines."""
    plt = pyplot()
    has_latency = any(r.get("latency_ratio") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_latency else 1, figsize=(12 if has_latency else 6.5, 4.6), squeeze=False)
    panels = [(axes[0][0], "bytes", 1e-6, "model size (MB)", "bytes")]
    if has_latency:
        panels.append((axes[0][1], "latency_ratio", 1.0, "latency (x original, median of alternating pairs)",
                       "latency"))
    original = next((r for r in rows if r.get("kind") == "original" or r.get("config") == "original"), None)
    for ax, key, scale, label, axis in panels:
        _sweep_panel(ax, [r for r in rows if r is not original], metric, key, scale, axis)
        if original is not None and original.get(key) is not None:
            ax.axvline(original[key] * scale, color="0.4", lw=1, ls=":", label="original (size, latency)")
            if original.get(metric) is not None:
                ax.axhline(original[metric], color="0.4", lw=1, ls="--", label=f"original ({metric.replace('_', ' ')})")
        ax.set_xlabel(label)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _sweep_panel(ax, rows: list[dict], metric: str, key: str, scale: float, axis: str) -> None:
    shown = [r for r in rows if r.get(key) is not None and r.get(metric) is not None]
    for label in sorted({r["config"] for r in shown}):
        mine = sorted((r for r in shown if r["config"] == label), key=lambda r: r.get("bytes") or 0)  # budget order
        baseline = all(r.get("kind") == "baseline" for r in mine)
        ax.plot([r[key] * scale for r in mine], [r[metric] for r in mine], marker="s" if baseline else "o",
                ls="none" if baseline else "-", ms=7 if baseline else 5, label=label)
    pareto = [r for r in shown if axis in r.get("pareto", [])]
    if pareto:
        ax.scatter([r[key] * scale for r in pareto], [r[metric] for r in pareto], s=140, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="Pareto point", zorder=5)


def plot_spectra(spectra: list[tuple[str, np.ndarray, int | None]], path: str | Path, title: str = "") -> Path:
    """Normalised weighted singular values per site, with the chosen rank marked (dense: no mark)."""
    plt = pyplot()
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
