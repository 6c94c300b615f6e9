"""The run's curves (the task's own metrics against step) beside its attempt timeline (matplotlib, Agg).

Curves: loss, then the task's metrics as logged (accuracy for classification, MSE/MAE
for regression, perplexity for a language model, whatever a custom task reports),
with resumes and committed checkpoints marked. Timeline (when the run has a goodput
record): one bar per attempt against wall time, coloured by phase, lost work hatched,
each resume linked to the commit of the checkpoint it restored.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from dist_train.errors import UserError
from dist_train.report.history import History

FORMATS = ("png", "svg", "pdf")
NOT_METRICS = {"step", "epoch", "lr", "generation", "time", "count", "samples_per_sec", "best_val_loss",
               "best_step", "split", "event"}
PREFERRED = ("accuracy", "mse", "mae", "perplexity", "token_accuracy")
MAX_METRICS = 3
PHASE_COLOURS = {"startup": "#9e9e9e", "restore": "#8e44ad", "train": "#2e86c1", "checkpoint": "#27ae60",
                 "lost": "#e74c3c"}


def plot_format(out: str) -> str:
    fmt = os.path.splitext(out)[1].lower().lstrip(".") or "png"
    if fmt not in FORMATS:
        raise UserError(f"--out {out}: the file name must end in .png, .svg or .pdf")
    return fmt


def metric_names(history: History) -> list[str]:
    """The metrics the run logged besides loss, the task's usual ones first."""
    found: set[str] = set()
    for split in ("train", "val"):
        for record in history.points.get(split, []):
            found.update(k for k, v in record.items() if k not in NOT_METRICS and k != "loss"
                         and isinstance(v, (int, float)) and not isinstance(v, bool))
    ordered = [k for k in PREFERRED if k in found] + sorted(found - set(PREFERRED))
    return ordered[:MAX_METRICS]


def plot_curves(history: History, checkpoint_steps: Sequence[int], out: str, title: str = "",
                goodput: dict[str, Any] | None = None) -> None:
    """Write a PNG (or SVG/PDF, by extension): the metric panels, and the timeline on the right if any."""
    fmt = plot_format(out)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = ["loss", *metric_names(history)]
    timeline = bool(goodput and goodput.get("attempts"))
    figure = Figure(figsize=(15 if timeline else 9, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    if timeline:
        left, right = figure.subfigures(1, 2, width_ratios=[1.1, 1])
        axes = left.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
        draw_timeline(right.subplots(1, 1), goodput)
    else:
        axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        _curve_panel(ax, history, key, checkpoint_steps, first=ax is axes[0])
    axes[-1].set_xlabel("step")
    if title:
        (left if timeline else figure).suptitle(title, fontsize="medium")
    try:
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise UserError(f"--out {out}: folder {folder} does not exist")
        figure.savefig(out, format=fmt)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None


def _curve_panel(ax, history: History, key: str, checkpoint_steps: Sequence[int], first: bool) -> None:
    steps, values = history.series("train", key)
    if steps and any(v == v for v in values):
        ax.plot(steps, values, color="tab:blue", linewidth=1.2, label=f"train {key}")
    steps, values = history.series("val", key)
    if steps and any(v == v for v in values):
        ax.plot(steps, values, color="tab:orange", linewidth=1.5, marker="o", markersize=4, label=f"val {key}")
    for i, resume in enumerate(history.resumes):
        ax.axvline(resume.step, color="tab:red", linestyle="--", linewidth=1.2, label="resume" if i == 0 else None)
        if first and resume.generation is not None:
            ax.text(resume.step, 0.98, f" attempt {resume.generation}", transform=ax.get_xaxis_transform(),
                    color="tab:red", fontsize="small", va="top")
    if checkpoint_steps:
        ax.plot(list(checkpoint_steps), [0.0] * len(checkpoint_steps), linestyle="none", marker="|",
                markersize=12, markeredgewidth=1.5, color="tab:green", transform=ax.get_xaxis_transform(),
                clip_on=False, label="checkpoint")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def draw_timeline(ax, goodput: dict[str, Any]) -> None:
    """One bar per attempt (top: the first) against seconds since the run's start."""
    from matplotlib.patches import Patch

    attempts = goodput["attempts"]
    origin = attempts[0]["start"]
    scale, unit = (60.0, "min") if goodput["elapsed_s"] > 600 else (1.0, "s")
    commit_at: dict[int, tuple[float, int]] = {}
    for row, attempt in enumerate(attempts):
        y = len(attempts) - 1 - row
        for phase, t0, t1 in attempt["phases"]:
            hatch = "////" if phase == "lost" else None
            ax.broken_barh([((t0 - origin) / scale, (t1 - t0) / scale)], (y - 0.3, 0.6),
                           facecolors=PHASE_COLOURS[phase], edgecolor="black" if hatch else "none", hatch=hatch,
                           linewidth=0.5, alpha=0.9 if phase != "lost" else 0.6)
        ax.text((attempt["end"] - origin) / scale, y, f"  {attempt['ended']}", va="center", fontsize="small")
        resumed = attempt.get("resumed_step")
        if resumed is not None and resumed in commit_at:
            t_commit, y_commit = commit_at[resumed]
            restore = next((p for p in attempt["phases"] if p[0] == "restore"), None)
            target = restore[1] if restore else attempt["start"]
            ax.annotate("", xy=((target - origin) / scale, y + 0.3), xytext=((t_commit - origin) / scale, y_commit - 0.3),
                        arrowprops={"arrowstyle": "->", "color": "#8e44ad", "linewidth": 1.2})
            ax.text((target - origin) / scale, y + 0.34, f"from step {resumed}", fontsize="x-small", color="#8e44ad")
        for step, t in attempt.get("commits", []):
            commit_at[step] = (t, y)
            ax.plot([(t - origin) / scale], [y + 0.3], marker="v", color="#27ae60", markersize=4)
    ax.set_yticks(range(len(attempts)), [f"attempt {a['generation']}\n({a.get('world_size') or '?'} ranks)"
                                         for a in reversed(attempts)])
    ax.set_xlabel(f"wall time since the first start ({unit})")
    ax.set_ylim(-0.7, len(attempts) - 0.3)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"attempts: goodput {goodput['goodput']:.1%} of {goodput['elapsed_s'] / scale:.1f} {unit}",
                 fontsize="medium")
    handles = [Patch(facecolor=c, label=p) for p, c in PHASE_COLOURS.items() if p != "lost"]
    handles.append(Patch(facecolor=PHASE_COLOURS["lost"], hatch="////", alpha=0.6, label="lost work"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(handles), fontsize="small",
              frameon=False)
    ax.set_xlim(right=max((a["end"] - origin) / scale for a in attempts) * 1.12)
