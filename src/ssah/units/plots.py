"""Plots of unit groups: the share of each layer's units in each group."""

from __future__ import annotations

from pathlib import Path

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
