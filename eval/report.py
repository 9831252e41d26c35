"""The bf16 vs PTQ vs QAT report: recovery arithmetic, a markdown table and a bar plot.

Degradation is measured in the metric's bad direction (accuracy lost, perplexity gained), and
the recovered share is (PTQ degradation - QAT degradation) / PTQ degradation, as in torchao's
QAT tables. A share is only meaningful when PTQ clearly hurts, so it is reported as n/a when the
PTQ degradation is within two standard errors (one standard error is about 1.3 accuracy points
on 900 multiple-choice items).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qat.eval.metrics import METRICS, Metric, reported

MODELS = ["bf16", "ptq", "qat"]
# Quantization-aware arms, in table order: plain QAT, QAT with distillation (QAD), and each with
# learned scales (LS).
ARMS = ["qat", "qad", "qat_ls", "qad_ls"]
LABELS = {"bf16": "no quantization", "ptq": "PTQ", "qat": "QAT", "qad": "QAD", "qat_ls": "QAT+LS",
          "qad_ls": "QAD+LS"}


def models(results: dict) -> list[str]:
    """The rows present: bf16 and PTQ, then every quantization-aware arm that was evaluated."""
    return ["bf16", "ptq"] + [a for a in ARMS if a in results]


def labels(simulated: bool = False) -> dict[str, str]:
    """Row names; simulated PTQ/QAT (fake-quantized forward, no real kernels) say so."""
    return {k: v + (" (simulated)" if simulated and k != "bf16" else "") for k, v in LABELS.items()}


def degradation(base: float, quant: float, higher_is_better: bool) -> float:
    """How much worse `quant` is than `base` (positive = worse)."""
    return base - quant if higher_is_better else quant - base


def recovered(base: float, ptq: float, qat: float, higher_is_better: bool,
              stderr: Optional[float] = None) -> Optional[float]:
    """Share of PTQ's degradation that QAT recovered; None when PTQ does not clearly hurt."""
    d_ptq = degradation(base, ptq, higher_is_better)
    if d_ptq <= 0 or (stderr is not None and d_ptq < 2 * stderr):
        return None
    return (d_ptq - degradation(base, qat, higher_is_better)) / d_ptq


def value(results: dict, model: str, m: Metric) -> Optional[float]:
    return results.get(model, {}).get(m.task, {}).get(m.name)


def stderr(results: dict, model: str, m: Metric) -> Optional[float]:
    return results.get(model, {}).get(m.task, {}).get(f"{m.name}_stderr")


def rows(results: dict, simulated: bool = False) -> dict[str, dict[str, Optional[float]]]:
    """{row label: {metric label: number}} for the table, the plot and W&B: one row per model, then
    the degradation of PTQ and of each arm, then the share of PTQ's degradation each arm recovered."""
    names = labels(simulated)
    keys = models(results)
    shown = reported(results)
    table = {names[k]: {m.label: value(results, k, m) for m in shown} for k in keys}
    deg = {k: {} for k in keys[1:]}
    rec = {a: {} for a in keys[2:]}
    for m in shown:
        b, p = value(results, "bf16", m), value(results, "ptq", m)
        if None in (b, p):
            continue
        errs = [e for e in (stderr(results, "bf16", m), stderr(results, "ptq", m)) if e is not None]
        se = (sum(e * e for e in errs)) ** 0.5 if errs else None
        deg["ptq"][m.label] = degradation(b, p, m.higher_is_better)
        for a in keys[2:]:
            q = value(results, a, m)
            if q is not None:
                deg[a][m.label] = degradation(b, q, m.higher_is_better)
                rec[a][m.label] = recovered(b, p, q, m.higher_is_better, se)
    for k in keys[1:]:
        table[f"{LABELS[k]} degradation"] = deg[k]
    for a in keys[2:]:
        table[f"recovered by {LABELS[a]}"] = rec[a]
    return table


def _fmt(x: Optional[float], row: str, results: dict, m: Metric, names: dict) -> str:
    if x is None:
        return "n/a"
    if row.startswith("recovered by "):
        return f"{100 * x:.0f}%"
    s = f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"
    key = next((k for k, v in names.items() if v == row), None)
    se = stderr(results, key, m) if key else None
    return f"{s} ± {se:.4f}" if se else s


def markdown(results: dict, header: dict, simulated: bool = False) -> str:
    """The report: what was run, then the table in the form torchao's README uses."""
    names = " vs ".join(["bf16"] + [LABELS[k] for k in models(results)[1:]])
    lines = [f"# {names}: {header.get('title', '')}".rstrip(": "), ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items() if k != "title"]
    shown = reported(results)
    lines += ["", "| | " + " | ".join(m.label for m in shown) + " |",
              "|---|" + "---|" * len(shown)]
    names = labels(simulated)
    for row, vals in rows(results, simulated).items():
        lines.append(f"| {row} | " + " | ".join(_fmt(vals.get(m.label), row, results, m, names) for m in shown) + " |")
    lines += ["", "Degradation is in each metric's bad direction (accuracy lost, perplexity gained). "
              "Recovered = (PTQ degradation - arm degradation) / PTQ degradation; n/a where PTQ's "
              "degradation is not above two standard errors. ± is lm-eval's standard error."]
    return "\n".join(lines) + "\n"


def _recovered_panel(ax, results: dict, arms: list[str], colors: dict, simulated: bool) -> None:
    """The headline: each arm's share of PTQ's degradation recovered, for two metrics."""
    shown = [m for m in METRICS if m.name in ("acc_norm", "bits_per_byte")]
    ax.axis("on")
    width = 0.8 / len(arms)
    for i, a in enumerate(arms):
        shares = [recovered(value(results, "bf16", m), value(results, "ptq", m), value(results, a, m),
                            m.higher_is_better) if None not in (value(results, "bf16", m), value(results, "ptq", m),
                                                                value(results, a, m)) else None for m in shown]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(shown))]
        bars = ax.bar(xs, [100 * (v or 0) for v in shares], width, color=colors[a], label=labels(simulated)[a])
        for bar, v in zip(bars, shares):
            ax.annotate("n/a" if v is None else f"{100 * v:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
    ax.axhline(100, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(shown)), [m.label for m in shown], fontsize=8)
    ax.set_ylabel("% of PTQ's loss recovered", fontsize=8)
    ax.set_title("recovered share\n(100% = as good as no quantization)", fontsize=9)
    ax.set_ylim(0, 125)
    ax.legend(fontsize=7, loc="upper center", ncol=len(arms), frameon=False)


def plot(results: dict, path: Path, title: str, simulated: bool = False) -> None:
    """One panel per metric (their scales differ), a bar per model, with standard-error whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"bf16": "#4C72B0", "ptq": "#DD8452", "qat": "#55A868", "qad": "#8172B3", "qat_ls": "#64B5CD",
              "qad_ls": "#CCB974"}
    keys = models(results)
    cols = min(3, len(METRICS))  # a grid, not one long row: a page or a W&B panel stays readable
    rows_ = -(-len(METRICS) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(max(3.2, 0.9 * len(keys)) * cols, 3.6 * rows_), squeeze=False)
    spare = list(axes.flat[len(METRICS):])
    for ax in spare:
        ax.axis("off")
    if spare and len(keys) > 2:
        _recovered_panel(spare[0], results, keys[2:], colors, simulated)
    for ax, m in zip(axes.flat, METRICS):
        vals = [value(results, k, m) or 0.0 for k in keys]
        errs = [stderr(results, k, m) or 0.0 for k in keys]
        bars = ax.bar([labels(simulated)[k].replace(" (", "\n(") for k in keys], vals, yerr=errs, capsize=3,
                      color=[colors[k] for k in keys])
        for bar, v, e in zip(bars, vals, errs):
            ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v + e), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        lo = min(vals) * 0.9 if not m.higher_is_better or min(vals) > 0.3 else 0
        ax.set_ylim(bottom=lo)
        ax.set_title(f"{m.label}\n({'higher' if m.higher_is_better else 'lower'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def coverage_note(coverage: dict) -> Optional[str]:
    """{arm: qat_coverage from verify.json} -> a header line naming what an arm left in high
    precision (qat.allow_unquantized), or None when every arm fake-quantized all decoder weights."""
    parts = [f"{LABELS.get(arm, arm)} fake-quantized {c['share']:.1%} of the decoder's weight parameters; "
             f"left in high precision: {', '.join(f'{k} {v}' for k, v in c['unquantized'].items())}"
             for arm, c in coverage.items() if c and c.get("unquantized")]
    return "; ".join(parts) or None
