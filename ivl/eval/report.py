"""Result tables: CSV + Markdown + PNG plot, every file written atomically."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from ivl._fs import atomic_write_bytes, atomic_write_text

logger = logging.getLogger("ivl")

COLUMNS = (
    "experiment",
    "config",
    "base",
    "value",
    "scheme",
    "alpha",
    "n_acc",
    "accuracy",
    "ci_low",
    "ci_high",
    "n_nll",
    "nll",
    "ppl",
    "gen_tokens",
    "cut_off",
    "wall_s",
    "note",
)


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_csv(path, rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c)) for c in columns})
    return atomic_write_text(path, buf.getvalue())


def markdown_table(rows: Sequence[dict]) -> str:
    """Accuracy (with 95% CI) and NLL per configuration."""
    head = (
        "| experiment | configuration | accuracy (95% CI) | N | mean answer (cut off) | NLL | ppl "
        "| N (NLL) | note |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = ""
        if r.get("accuracy") is not None and r.get("n_acc"):
            acc = f"{100 * r['accuracy']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
        answer = ""
        if r.get("gen_tokens") is not None and r.get("n_acc"):
            answer = f"{r['gen_tokens'] / r['n_acc']:.0f} tokens"
            if r.get("cut_off") is not None:
                answer += f" ({r['cut_off']})"
        nll = f"{r['nll']:.4f}" if r.get("nll") is not None else ""
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") is not None else ""
        lines.append(
            f"| {r.get('experiment', '')} | {r['config']} | {acc} | {r.get('n_acc') or ''} | "
            f"{answer} | {nll} | {ppl} | {r.get('n_nll') or ''} | {r.get('note') or ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(path, rows: Sequence[dict], title: str = "") -> Path | None:
    """Two panels (accuracy with 95% CI, NLL) by configuration; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    labels = [f"{r.get('experiment', '')}: {r['config']}".strip(": ") for r in rows]
    y = list(range(len(rows)))
    # one panel per measured metric (a run may skip accuracy or NLL)
    panels = [m for m in ("accuracy", "nll") if any(r.get(m) is not None for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 0.45 * len(rows) + 1.6), sharey=True
    )
    axes = dict(zip(panels, axes if len(panels) > 1 else [axes], strict=True))
    for ax in axes.values():
        ax.set_yticks(y, labels)
        ax.grid(axis="x", alpha=0.3)
    axes[panels[0]].invert_yaxis()
    if "accuracy" in axes:
        _accuracy_panel(axes["accuracy"], rows, y)
    if "nll" in axes:
        _nll_panel(axes["nll"], rows, y)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    # "tight": long configuration labels and titles widen the image instead of being cut off
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _accuracy_panel(ax, rows, y) -> None:
    acc = [100 * r["accuracy"] if r.get("accuracy") is not None else math.nan for r in rows]
    err = [
        [
            a - 100 * r["ci_low"] if r.get("accuracy") is not None else 0
            for a, r in zip(acc, rows, strict=True)
        ],
        [
            100 * r["ci_high"] - a if r.get("accuracy") is not None else 0
            for a, r in zip(acc, rows, strict=True)
        ],
    ]
    ax.barh(y, acc, xerr=err, color="tab:blue", alpha=0.8, capsize=3)
    ax.set_xlabel("accuracy % (95% Wilson CI)")


def _nll_panel(ax, rows, y) -> None:
    nll = [r["nll"] if r.get("nll") is not None else math.nan for r in rows]
    # Points, not bars: the axis is zoomed onto the values, and a bar's length would then
    # exaggerate the differences. Each point carries its value.
    ax.plot(nll, y, "o", color="tab:orange")
    ax.set_xlabel("held-out NLL (nats / token, lower is better; axis zoomed)")
    finite = [x for x in nll if not math.isnan(x)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = 0.15 * (hi - lo + 1e-3)
        ax.set_xlim(lo - pad, hi + 2 * pad)
        for v, yy in zip(nll, y, strict=True):
            if not math.isnan(v):
                ax.annotate(f"{v:.3f}", (v, yy), xytext=(6, -3), textcoords="offset points")


def write_report(out_dir, name: str, rows: Sequence[dict], *, title: str = "", notes: str = ""):
    """``{name}.csv``, ``{name}.md`` (table + notes) and ``{name}.png`` under ``out_dir``."""
    out = Path(out_dir)
    paths = [write_csv(out / f"{name}.csv", rows)]
    md = (
        (f"# {title}\n\n" if title else "")
        + markdown_table(rows)
        + (f"\n{notes}\n" if notes else "")
    )
    paths.append(atomic_write_text(out / f"{name}.md", md))
    png = plot(out / f"{name}.png", rows, title)
    if png is not None:
        paths.append(png)
    return paths
