"""Plots of the attack grid: a defense x family heatmap of the worst point's test ASR, and each defense's
worst case over all families with its Wilson 95% interval (worst points picked on calibration prompts)."""

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


def _worst_rows(summary: dict) -> dict:
    """{defense: {family: the row of its worst point}} (rows with a test ASR only)."""
    out: dict = {}
    for row in summary["rows"]:
        picked = summary["worst_case"].get(row["defense"], {}).get(row["family"])
        if picked and row["asr"] is not None and (row["attack"], row["lr"], row["steps"]) == (
                picked["attack"], picked["lr"], picked["steps"]):
            out.setdefault(row["defense"], {})[row["family"]] = row
    return out


def plot_heatmap(summary: dict, path: Path) -> Path:
    """Rows: defenses; columns: attack families; colour and label: test ASR (%) at the worst point picked
    on calibration prompts among those that kept the model useful ("-": none did, or it was not tested)."""
    import numpy as np

    worst = _worst_rows(summary)
    defenses = list(summary["worst_case"])
    families = list(dict.fromkeys(row["family"] for row in summary["rows"]))
    values = np.full((len(defenses), len(families)), np.nan)
    for i, d in enumerate(defenses):
        for j, f in enumerate(families):
            row = worst.get(d, {}).get(f)
            if row is not None:
                values[i, j] = 100 * row["asr"]
    figure = _figure(1.2 * len(families) + 4.5, 0.45 * len(defenses) + 1.6)
    ax = figure.subplots()
    image = ax.imshow(values, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(families)), families, rotation=30, ha="right", fontsize="small")
    ax.set_yticks(range(len(defenses)), defenses, fontsize="small")
    for i in range(len(defenses)):
        for j in range(len(families)):
            text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="white" if not np.isnan(values[i, j]) and values[i, j] > 60 else "black")
    figure.colorbar(image, ax=ax, label=f"test ASR % ({summary.get('rule', 'prefix')} rule)")
    ax.set_title("Fine-tuning attacks: worst point (picked on calibration, utility kept)", fontsize="medium")
    figure.tight_layout()
    return save_png(figure, path)


def plot_worst_bars(summary: dict, path: Path) -> Path:
    """Each defense's highest test ASR over the families' worst points."""
    rows = {d: max(by.values(), key=lambda row: row["asr"]) for d, by in _worst_rows(summary).items() if by}
    defenses = [d for d in summary["worst_case"] if d in rows]
    figure = _figure(0.8 * len(defenses) + 2.5, 3.4)
    ax = figure.subplots()
    values = [100 * rows[d]["asr"] for d in defenses]
    rule = summary.get("rule", "prefix")
    cis = [((rows[d]["eval"].get("ci") or {}).get("asr") or {}).get(rule) or (rows[d]["asr"],) * 2 for d in defenses]
    errors = [[v - 100 * lo for v, (lo, _) in zip(values, cis)], [100 * hi - v for v, (_, hi) in zip(values, cis)]]
    ax.bar(range(len(defenses)), values, yerr=errors, capsize=3, color="#d62728")
    before = summary["before"].get("plain") or next(iter(summary["before"].values()))
    asr = before.get("asr", {}).get(rule) if isinstance(before.get("asr"), dict) else before.get("asr")
    if asr is not None:
        ax.axhline(100 * asr, color="black", lw=1, ls="--", label="before any attack")
        ax.legend(fontsize="small", frameon=False)
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize="small")
    ax.set_ylim(0, 100)
    ax.set_ylabel("worst-case test ASR % [95% CI]")
    figure.tight_layout()
    return save_png(figure, path)
