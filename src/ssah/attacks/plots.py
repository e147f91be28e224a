"""Plots of the attack grid: a defense x attack heatmap of worst-case ASR, and each defense's
worst case over all attacks with its Wilson 95% interval."""

from __future__ import annotations

from pathlib import Path

from ssah.io import save_png

HEATMAP, WORST_BARS = "attack_heatmap.png", "attack_worst_case.png"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_heatmap(summary: dict, path: Path) -> Path:
    """Rows: defenses; columns: attacks; colour and label: worst-case ASR (%) over the sweep points that
    kept the model useful ("-": none did)."""
    import numpy as np

    worst = summary["worst_case"]
    defenses = list(worst)
    attacks = list(dict.fromkeys(a for by in worst.values() for a in by))
    values = np.full((len(defenses), len(attacks)), np.nan)
    for i, d in enumerate(defenses):
        for j, a in enumerate(attacks):
            cell = worst[d].get(a)
            if cell is not None:
                values[i, j] = 100 * cell["asr"]
    figure = _figure(1.2 * len(attacks) + 3, 0.45 * len(defenses) + 1.6)
    ax = figure.subplots()
    image = ax.imshow(values, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right", fontsize="small")
    ax.set_yticks(range(len(defenses)), defenses, fontsize="small")
    for i in range(len(defenses)):
        for j in range(len(attacks)):
            text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="white" if not np.isnan(values[i, j]) and values[i, j] > 60 else "black")
    figure.colorbar(image, ax=ax, label=f"worst-case ASR % ({summary.get('rule', 'prefix')} rule)")
    ax.set_title("Fine-tuning attacks: worst case over the sweep (utility kept)", fontsize="medium")
    figure.tight_layout()
    return save_png(figure, path)


def plot_worst_bars(summary: dict, path: Path) -> Path:
    """Each defense's worst case over every attack and sweep point that kept the model useful."""
    rows = {}
    for row in summary["rows"]:
        if row["utility_kept"] and row["asr"] is not None:
            best = rows.get(row["defense"])
            if best is None or row["asr"] > best["asr"]:
                rows[row["defense"]] = row
    defenses = [d for d in summary["worst_case"] if d in rows]
    figure = _figure(0.8 * len(defenses) + 2.5, 3.4)
    ax = figure.subplots()
    values = [100 * rows[d]["asr"] for d in defenses]
    rule = summary.get("rule", "prefix")
    cis = [rows[d]["eval"]["ci"]["asr"].get(rule) or (rows[d]["asr"],) * 2 for d in defenses]
    errors = [[v - 100 * lo for v, (lo, _) in zip(values, cis)], [100 * hi - v for v, (_, hi) in zip(values, cis)]]
    ax.bar(range(len(defenses)), values, yerr=errors, capsize=3, color="#d62728")
    before = summary["before"].get("plain") or next(iter(summary["before"].values()))
    asr = before.get("asr", {}).get(rule) if isinstance(before.get("asr"), dict) else before.get("asr")
    if asr is not None:
        ax.axhline(100 * asr, color="black", lw=1, ls="--", label="before any attack")
        ax.legend(fontsize="small", frameon=False)
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize="small")
    ax.set_ylim(0, 100)
    ax.set_ylabel("worst-case ASR % [95% CI]")
    figure.tight_layout()
    return save_png(figure, path)
