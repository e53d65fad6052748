"""Figures kdscale attaches to its MLflow runs, so a run page answers "did it learn, from what,
and how close did it get to the teacher" without opening a notebook.

Pure matplotlib (Agg backend, no display), built from plain numbers; the caller logs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _figure(ncols: int = 1, width: float = 6.0):
    """A figure outside pyplot's global state (its own Agg canvas): students trained at once draw
    theirs from several threads, which pyplot does not support."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 3.8))
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, list(axes[0])


def loss_curves(history: Sequence[dict[str, Any]], title: str, evals: Sequence[dict[str, Any]] = ()):
    """KD, CE and total loss per optimizer step, with epoch boundaries marked, and the held-out
    CE measured during training when there is one."""
    fig, (ax,) = _figure()
    steps = [h["step"] for h in history]
    for key, label in (("loss", "total"), ("kd", "KD (T² · divergence)"), ("ce", "CE (hard labels)")):
        ax.plot(steps, [h[key] for h in history], label=label, linewidth=1.4)
    if evals:
        ax.plot(
            [e["step"] for e in evals],
            [e["heldout_ce"] for e in evals],
            "o--",
            color="black",
            label="held-out CE",
            linewidth=1.0,
            markersize=4,
        )
    for prev, cur in zip(history, history[1:]):
        if cur["epoch"] != prev["epoch"]:
            ax.axvline(prev["step"] + 0.5, color="0.85", linewidth=0.8, zorder=0)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def eval_bars(metrics: dict[str, float], untrained_ce: float | None, title: str):
    """Held-out cross-entropy of the untrained student, the distilled student and the teacher, and
    the student's top-1 agreement with the teacher."""
    fig, (ce_ax, agree_ax) = _figure(2, width=4.2)
    names, values, colours = [], [], []
    for name, value, colour in (
        ("untrained", untrained_ce, "0.7"),
        ("student", metrics.get("heldout_ce"), "tab:blue"),
        ("teacher", metrics.get("teacher_heldout_ce"), "tab:green"),
    ):
        if value is not None:
            names.append(name)
            values.append(value)
            colours.append(colour)
    bars = ce_ax.bar(names, values, color=colours)
    ce_ax.bar_label(bars, fmt="%.3f")
    ce_ax.set(ylabel="held-out cross-entropy (nats/token)", title=title)
    agreement = metrics.get("top1_agreement")
    if agreement is not None:
        bar = agree_ax.bar(["student vs teacher"], [agreement], color="tab:blue")
        agree_ax.bar_label(bar, fmt="%.3f")
    agree_ax.set(ylim=(0, 1), ylabel="top-1 agreement with the teacher")
    fig.tight_layout()
    return fig


def cache_profile(ids_per_position: np.ndarray, tail_mass: np.ndarray | None, teacher_nll: np.ndarray, title: str):
    """How much of the teacher each cached position keeps: stored ids per position, the
    probability outside the k most likely ids (top-k: dropped into one bucket; stratified:
    sampled), and the teacher's own NLL per token (by sequence)."""
    panels = 3 if tail_mass is not None else 2
    fig, axes = _figure(panels, width=4.2)
    axes[0].hist(ids_per_position, bins=min(50, max(int(ids_per_position.max()), 1)), color="tab:blue")
    axes[0].set(
        xlabel="stored ids per position", ylabel="positions", title=f"{title}\nmean {ids_per_position.mean():.1f} ids"
    )
    axes[1].hist(teacher_nll, bins=50, color="tab:green")
    axes[1].set(
        xlabel="teacher NLL per token, by sequence (nats)",
        ylabel="sequences",
        title=f"mean {teacher_nll.mean():.2f} nats",
    )
    if tail_mass is not None:
        axes[2].hist(tail_mass, bins=50, range=(0, 1), color="tab:orange")
        axes[2].set(
            xlabel="tail mass: probability outside the k most likely ids",
            ylabel="positions",
            title=f"mean {tail_mass.mean():.3f}",
        )
    fig.tight_layout()
    return fig


def student_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    title: str,
    baseline: str | None = None,
    teacher_ce: float | None = None,
):
    """Held-out CE against training tokens, one line per student (the baseline dashed), and the
    teacher's CE as a floor."""
    fig, (ax,) = _figure(width=7.0)
    for name, points in curves.items():
        tokens, ce = zip(*points)
        ax.plot(
            tokens,
            ce,
            "--" if name == baseline else "-",
            marker="o",
            markersize=3,
            linewidth=1.4,
            label=f"{name} (baseline)" if name == baseline else name,
        )
    if teacher_ce is not None:
        ax.axhline(teacher_ce, color="tab:green", linewidth=0.8, linestyle=":", label="teacher")
    ends = [points[-1][1] for points in curves.values()]
    if ends:
        low = min(ends + ([teacher_ce] if teacher_ce is not None else []))
        ax.set_ylim(low - 0.2, max(ends) + max(1.0, max(ends) - low))
    ax.set(xlabel="training tokens", ylabel="held-out CE (nats/token)", title=title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
