"""Plots of unit groups (the share of each layer's units in each group) and of the faithfulness table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssah.defaults import GROUP_NAMES
from ssah.io import save_png

GROUP_COLORS = {"SCU": "#d62728", "UCU": "#1f77b4", "CU": "#c7c7c7", "RU": "#2ca02c"}


def plot_groups_per_layer(groups, path: str | Path) -> Path:
    """Stacked bars, one panel per unit kind: the share of each layer's units in each group (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A bare Figure with the Agg canvas: no pyplot, so the caller's backend (e.g. a notebook's) is untouched.
    kinds = groups.kinds
    figure = Figure(figsize=(max(6.0, 0.25 * groups.meta["num_layers"] + 2), 2.6 * len(kinds)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(kinds), 1, squeeze=False)[:, 0]
    order = ("SCU", "UCU", "RU", "CU")
    per_kind = groups.counts_per_kind()
    for ax, kind in zip(axes, kinds):
        labels = groups.labels[kind]
        layers = torch.arange(labels.shape[0]).numpy()
        bottom = torch.zeros(labels.shape[0], dtype=torch.float64)
        for name in order:
            share = (labels == GROUP_NAMES.index(name)).to(torch.float64).mean(dim=1)
            ax.bar(layers, share.numpy(), bottom=bottom.numpy(), color=GROUP_COLORS[name], width=0.85,
                   label=f"{name} ({per_kind[kind][name]})")
            bottom += share
        ax.set_xlim(-0.6, labels.shape[0] - 0.4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{kind}: share of units")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    axes[-1].set_xlabel("layer")
    meta = groups.meta
    figure.suptitle(f"unit groups per layer (normalize={meta['normalize']}, ranking={meta['ranking']})",
                    fontsize="medium")
    figure.tight_layout()
    return save_png(figure, path)


def cell_name(cell: dict) -> str:
    return f"{cell['scorer']} / {cell['normalize']} / {cell['ranking']}"


def plot_faithfulness(table: dict, path: str | Path) -> Path:
    """Three panels, one row per cell: SCU's ASR rise, UCU's task-accuracy drop, RU's perplexity ratio,
    each with its 95% interval; the dotted line is random units of the group's size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = table["cells"]
    names = [cell_name(c) for c in cells]
    panels = (("SCU", "asr_rise", "SCU pruned: ASR rise (points)", 100),
              ("UCU", "task_drop", "UCU pruned: task-accuracy drop (points)", 100),
              ("RU", "perplexity_ratio", "RU pruned: perplexity ratio", 1))
    figure = Figure(figsize=(13, 1.2 + 0.32 * len(cells)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3, sharey=True)
    y = np.arange(len(cells))
    for ax, (group, key, title, scale) in zip(axes, panels):
        values = np.array([c["groups"][group][key] for c in cells]) * scale
        cis = np.array([c["groups"][group][f"{key}_ci"] for c in cells]) * scale
        errors = np.abs(np.stack([values - cis[:, 0], cis[:, 1] - values]))
        start = 1.0 if key == "perplexity_ratio" else 0.0  # a ratio's bar starts at "unchanged"
        ax.barh(y, values - start, left=start, xerr=errors, color="#4c72b0", ecolor="black", capsize=2, height=0.6)
        random = np.mean([c["groups"][group][f"random_{key}"] for c in cells]) * scale
        ax.axvline(random, color="#d62728", ls=":", lw=1.2, label=f"random, same size ({random:.3g})")
        if key == "perplexity_ratio":
            ax.axvline(1.30, color="grey", ls="--", lw=0.8, label="x1.30")
            ax.set_xlim(0.9, min(max(float(cis[:, 1].max()), 1.5) * 1.05, 40))
        ax.set_title(title, fontsize="medium")
        ax.legend(fontsize="x-small", loc="lower right")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize="small")
    axes[0].invert_yaxis()
    figure.suptitle(f"Faithfulness of unit scores: {table['model']}", fontsize="medium")
    figure.tight_layout()
    return save_png(figure, path)
