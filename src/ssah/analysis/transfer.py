"""Attribute transfer: how units change group after training (the paper's Figures 5 and 6).

Regroup the trained model with the same sizes, normalisation and ranking as before
(`regroup_like`), then cross-tabulate old against new labels: entry [i, j] is the share of all
units that were in group i before and are in group j after. Rows sum to the old group sizes,
columns to the new ones, and the whole table to 100%.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssah.errors import SsahError
from ssah.io import save_png
from ssah.outputs import OutputKind
from ssah.units.groups import GROUP_NAMES, Groups, make_groups

TRANSFER = OutputKind("transfer", ("transfer.json", "transfer.png"), record="transfer.json")


def regroup_like(before: Groups, safety_after, utility_after) -> Groups:
    """Groups of the trained model with the sizes, normalisation and ranking used before (RU's own too)."""
    ru = before.meta.get("ru_definition") or {}
    return make_groups(safety_after, utility_after, before.meta["sizes"],
                       normalize=before.meta["normalize"], ranking=before.meta["ranking"],
                       ru_normalize=ru.get("normalize"), ru_ranking=ru.get("ranking"))


def transition_table(before: Groups, after: Groups) -> torch.Tensor:
    """[4, 4] shares of all units: rows = group before, columns = group after (GROUP_NAMES order)."""
    if set(before.labels) != set(after.labels) or any(
            before.labels[k].shape != after.labels[k].shape for k in before.labels):
        raise SsahError("the two groupings cover different unit layouts; compare groups of the same architecture")
    table = torch.zeros(len(GROUP_NAMES), len(GROUP_NAMES), dtype=torch.float64)
    for kind in before.labels:
        pairs = before.labels[kind].long().flatten() * len(GROUP_NAMES) + after.labels[kind].long().flatten()
        table += torch.bincount(pairs, minlength=len(GROUP_NAMES) ** 2).view(len(GROUP_NAMES), -1).double()
    return table / table.sum()


def transfer_summary(before: Groups, after: Groups) -> dict:
    """The table as JSON, plus per group the share of its units that left it."""
    table = transition_table(before, after)
    rows = table.sum(dim=1)
    left = {name: (float(1 - table[i, i] / rows[i]) if rows[i] > 0 else None) for i, name in enumerate(GROUP_NAMES)}
    return {
        "groups": list(GROUP_NAMES),
        "table_percent": [[round(float(v) * 100, 4) for v in row] for row in table],
        "rows": "group before", "columns": "group after",
        "share_left_group": left,
        "before_model": before.model_fingerprint, "after_model": after.model_fingerprint,
        "sizes": before.meta["sizes"], "normalize": before.meta["normalize"], "ranking": before.meta["ranking"],
    }


def plot_transfer(summary: dict, path: str | Path, title: str = "attribute transfer") -> Path:
    """A heatmap of the transition table (percent of all units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table_percent"]
    names = summary["groups"]
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    image = ax.imshow(table, cmap="Blues")
    for i, row in enumerate(table):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center",
                    color="white" if value > max(map(max, table)) / 2 else "black", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("after training")
    ax.set_ylabel("before training")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="% of all units")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
