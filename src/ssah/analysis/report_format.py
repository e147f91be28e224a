"""How the run report writes numbers: rates with intervals, tests in words, tables, images and bar
charts with 95% error bars (HTML fragments)."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from ssah.analysis.verdicts import rate as _rate

# -- formatting ----------------------------------------------------------------------------------------


def fmt_number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.3g}" if abs(value) >= 10 or (value and abs(value) < 1e-3) else f"{value:.3f}"
    return str(value)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def ci_text(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _points(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def _p(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def shown_text(value, limit: int = 300) -> str:
    """Model or user text, shown safely: control characters made visible, cut at `limit`, escaped."""
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", str(value))
    if len(text) > limit:
        text = text[:limit] + "…"
    return html.escape(text)


def label_text(key: str) -> str:
    return html.escape(str(key).replace("_", " "))


def html_table(columns, rows, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless `raw` (cells already HTML)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    cell = (lambda v: str(v)) if raw else (lambda v: html.escape(fmt_number(v)))
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def rate_interval(block: dict | None, key: str, rule: str = "prefix") -> tuple[float | None, list | None]:
    """A rate (under `rule` where the summary holds one per rule) and its 95% interval; Wilson from the
    count when the summary holds no interval."""
    from ssah.evaluate.stats import wilson_interval

    value, ci = _rate(block, key, rule)
    if value is not None and not ci:
        n = ((block or {}).get("n") or {}).get(key)
        if isinstance(n, int) and n > 0:
            ci = list(wilson_interval(round(value * n), n))
    return value, ci


def rate_cell(block: dict | None, key: str, rule: str = "prefix") -> str:
    value, ci = rate_interval(block, key, rule)
    return pct(value) + ci_text(ci)


def eval_row(label: str, block: dict | None, rule: str = "prefix") -> list:
    if not block:
        return [label, "-", "-", "-", "-", "-", "-"]
    n = (block.get("n") or {}).get("asr")
    return [label, rate_cell(block, "asr", rule), n, rate_cell(block, "prefill_asr", rule),
            rate_cell(block, "overrefusal_rate"), rate_cell(block, "task_accuracy"),
            fmt_number(block.get("perplexity"))]


def eval_columns(rule: str = "prefix") -> tuple[str, ...]:
    return ("model", f"ASR % ({rule}) [95% CI]", "n", f"prefill ASR % ({rule}) [95% CI]", "over-refusal % [95% CI]",
            "task accuracy % [95% CI]", "perplexity")


def _img(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"></figure>'


def image_tag(path: Path) -> str:
    return _img(path.read_bytes(), path.name) if path.is_file() else ""


# -- the numbers of a verdict --------------------------------------------------------------------------

_RATE_WORDS = ("asr", "rate", "accuracy", "overrefusal", "share", "frozen")
_CHANGE_WORDS = ("rise", "drop", "change")


def _is_interval(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def is_test(value) -> bool:
    """A test's result: a dict with a p-value and/or an interval (`paired_exact_test`, a bootstrap)."""
    return isinstance(value, dict) and ("p_value" in value or _is_interval(value.get("ci")))


def _number(key: str, value) -> str:
    """One number of a verdict, read by its key: rates in %, their changes in points, ratios as x."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(fmt_number(value))
    k = key.lower()
    if "ratio" in k:
        return f"×{value:.3g}"
    if any(w in k for w in _CHANGE_WORDS) or (k.startswith("difference") and any(w in k for w in _RATE_WORDS)):
        return f"{_points(value)} points"
    if isinstance(value, float) and any(w in k for w in _RATE_WORDS):
        return f"{pct(value)}%"
    return html.escape(fmt_number(value))


def value_text(key: str, value) -> str:
    if key.startswith("ci") and _is_interval(value):
        return f"[{100 * value[0]:.0f}, {100 * value[1]:.0f}]%"
    if isinstance(value, dict):
        return "; ".join(f"{html.escape(str(k))} {value_text(key, v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(value_text(key, v) for v in value) or "-"
    return _number(key, value)


def test_text(test: dict, points: bool) -> str:
    """A test in words (HTML): its p-value, then what it counted (exact McNemar) or estimated (an interval,
    e.g. a paired bootstrap); `points`: the interval is of a rate's change, shown in points."""
    from ssah.analysis.verdicts import p_text

    shown = {"p_value", "seed", "p_floor"}
    parts = [p_text(test)] if "p_value" in test else []
    if "rose" in test and "fell" in test:
        shown |= {"rose", "fell", "n", "outcome"}
        outcome = html.escape(str(test.get("outcome") or "the outcome"))
        parts.append(f"exact McNemar: {html.escape(str(test.get('n', '?')))} paired prompts, n discordant = "
                     f"{test['rose'] + test['fell']} ({test['rose']} turned to {outcome}, {test['fell']} turned away)")
    if _is_interval(test.get("ci")):
        shown |= {"ci", "mean_difference", "level", "resamples", "n"}
        scale = _points if points else (lambda v: f"{v:+.3g}")
        unit = " points" if points else ""
        lo, hi = test["ci"]
        mean = test.get("mean_difference")
        estimate = f"mean difference {scale(mean)}{unit}, " if isinstance(mean, (int, float)) else ""
        how = "" if "resamples" not in test else \
            f" (bootstrap, {html.escape(str(test['resamples']))} resamples of {html.escape(str(test.get('n', '?')))})"
        level = test.get("level") if isinstance(test.get("level"), (int, float)) else 0.95
        parts.append(f"{estimate}{100 * level:.0f}% interval [{scale(lo)}, {scale(hi)}]{unit}{how}")
    parts += [f"{label_text(k)} {value_text(k, v)}" for k, v in test.items() if k not in shown]
    return "; ".join(parts)


def verdict_tests_html(verdict: dict) -> str:
    """One verdict's tests as HTML sentences: each part with its numbers, test, n and minimum detectable
    effect and what it found, then why the verdict is inconclusive where it is."""
    items = []
    for part in verdict.get("tests") or []:
        found = "shown, not counted" if part.get("decides") is False else part.get("result", "")
        items.append(f"<li>{html.escape(str(part.get('text', '')))} <i>({html.escape(str(found))})</i></li>")
    reason = verdict.get("reason")
    why = f"<p class=note>Inconclusive: {html.escape(str(reason))}.</p>" \
        if reason and verdict.get("verdict") == "inconclusive" else ""
    return f"<ul class=numbers>{''.join(items)}</ul>{why}" if items else why or "-"


# -- charts --------------------------------------------------------------------------------------------

_COLOURS = {"none": "#7f7f7f", "before": "#7f7f7f", "SCU": "#d62728", "UCU": "#1f77b4", "RU": "#2ca02c",
            "plain": "#ff7f0e", "freeze_i": "#9467bd", "freeze_ii": "#8c564b", "freeze_budget": "#e377c2",
            "lora": "#17becf", "without": "#7f7f7f", "with": "#2ca02c"}


def _colour(label: str) -> str:
    if label.lower().startswith("random"):
        return "#c7c7c7"
    return _COLOURS.get(label, "#4c72b0")


def bar_chart(title: str, panels: list[tuple[str, list[tuple[str, float | None, list | None]]]]) -> str:
    """Bar panels [(y label, [(bar label, rate, 95% interval)])] as an embedded PNG, rates in %, each
    bar with its interval as an error bar; "" when no panel has a value."""
    panels = [(ylabel, [b for b in bars if b[1] is not None]) for ylabel, bars in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return ""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    widest = max(len(bars) for _, bars in panels)
    figure = Figure(figsize=(len(panels) * max(3.2, 0.55 * widest + 1.4), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, bars) in zip(axes, panels):
        xs = list(range(len(bars)))
        values = [100 * v for _, v, _ in bars]
        lower = [max(0.0, 100 * (v - ci[0])) if ci else 0.0 for _, v, ci in bars]
        upper = [max(0.0, 100 * (ci[1] - v)) if ci else 0.0 for _, v, ci in bars]
        ax.bar(xs, values, color=[_colour(label) for label, _, _ in bars], yerr=[lower, upper], capsize=4,
               ecolor="#333333")
        ax.set_xticks(xs)
        ax.set_xticklabels([label for label, _, _ in bars], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{title} (bars: 95% intervals)", fontsize="medium")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return _img(buffer.getvalue(), title)


def pruning_chart(prune: dict, rule: str = "prefix") -> str:
    return bar_chart("pruning ablation: ASR and task accuracy per pruned mask", [
        (f"ASR % ({rule})", [(m, *rate_interval(v, "asr", rule)) for m, v in prune.items()]),
        ("task accuracy %", [(m, *rate_interval(v, "task_accuracy")) for m, v in prune.items()])])


def finetune_chart(before: dict | None, ft: dict, rule: str = "prefix") -> str:
    bars = [("before", *rate_interval(before, "asr", rule))] if before else []
    bars += [(k, *rate_interval(v, "asr", rule)) for k, v in ft.items()]
    return bar_chart("benign fine-tuning: ASR per setting", [(f"ASR % ({rule})", bars)])


def monitor_chart(monitor: dict, rule: str = "prefix") -> str:
    blocks = [("without", monitor.get("without")), ("with", monitor.get("with"))]
    return bar_chart("runtime monitor: prefill-attack ASR and over-refusal", [
        (f"prefill ASR % ({rule})", [(k, *rate_interval(b, "prefill_asr", rule)) for k, b in blocks]),
        ("over-refusal %", [(k, *rate_interval(b, "overrefusal_rate")) for k, b in blocks])])


