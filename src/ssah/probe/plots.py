"""Plots of the reasoning-direction probe (matplotlib, Agg backend: no display needed).

Each model gets one colour; refusal is a solid line, compliance a dashed one, and the shaded band
is the 95% bootstrap interval over prompts. Several models (e.g. before and after alignment) share
the axes so they can be compared directly.
"""

from __future__ import annotations

from pathlib import Path

from ssah.io import save_png

LENGTH_PLOT = "distance_by_length.png"
LAYER_PLOT = "distance_by_layer.png"
_STYLES = {"refusal": "-", "compliance": "--"}


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=120)
    return plt, fig, ax


def _ylabel(report: dict) -> str:
    what = "last-token" if report["position"] == "last" else "opening-mean"
    label = f"cosine distance from the clean prompt ({what} state)"
    if report["baseline"] == "neutral":
        label += "\nminus a neutral continuation's"
    return label


def _draw(reports: list[tuple[str, dict]], rows_key: str, x_key: str, xlabel: str, title: str, path: Path) -> Path:
    plt, fig, ax = _axes()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, report) in enumerate(reports):
        rows = report[rows_key]
        xs = [row[x_key] for row in rows]
        for kind, style in _STYLES.items():
            means = [row[kind]["mean"] for row in rows]
            low = [row[kind]["ci95"][0] for row in rows]
            high = [row[kind]["ci95"][1] for row in rows]
            colour = colours[index % len(colours)]
            ax.plot(xs, means, style, color=colour, marker="o", markersize=3, label=f"{label}: {kind}")
            ax.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_ylabel(reports[0][1]), fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def plot_reports(reports: list[tuple[str, dict]], out_dir: str | Path) -> list[Path]:
    """Write the two plots for (label, report) pairs (reports from `reasoning.build_report`)."""
    out_dir = Path(out_dir)
    n = reports[0][1]["n_prompts"]
    by_length = _draw(reports, "by_length", "length", "opening length (tokens)",
                      f"Distance vs opening length (mean over layers, {n} prompts, 95% CI)",
                      out_dir / LENGTH_PLOT)
    by_layer = _draw(reports, "by_layer", "layer", "layer (block output)",
                     f"Distance per layer (mean over opening lengths, {n} prompts, 95% CI)",
                     out_dir / LAYER_PLOT)
    return [by_length, by_layer]
