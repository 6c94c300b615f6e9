"""Loss and accuracy against step, with resumes and committed checkpoints marked (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Sequence

from dist_train.errors import UserError
from dist_train.report.history import History

FORMATS = ("png", "svg", "pdf")


def plot_format(out: str) -> str:
    fmt = os.path.splitext(out)[1].lower().lstrip(".") or "png"
    if fmt not in FORMATS:
        raise UserError(f"--out {out}: the file name must end in .png, .svg or .pdf")
    return fmt


def plot_curves(history: History, checkpoint_steps: Sequence[int], out: str, title: str = "") -> None:
    """Write a PNG (or SVG/PDF, by extension) with two panels, loss and accuracy, sharing the step axis."""
    fmt = plot_format(out)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(2, 1, sharex=True)
    for ax, key, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        steps, values = history.series("train", key)
        if steps:
            ax.plot(steps, values, color="tab:blue", linewidth=1.2, label=f"train {label}")
        steps, values = history.series("val", key)
        if steps:
            ax.plot(steps, values, color="tab:orange", linewidth=1.5, marker="o", markersize=4,
                    label=f"val {label}")
        for i, resume in enumerate(history.resumes):
            ax.axvline(resume.step, color="tab:red", linestyle="--", linewidth=1.2,
                       label="resume" if i == 0 else None)
            if ax is loss_ax and resume.generation is not None:
                ax.text(resume.step, 0.98, f" attempt {resume.generation}", transform=ax.get_xaxis_transform(),
                        color="tab:red", fontsize="small", va="top")
        if checkpoint_steps:
            ax.plot(list(checkpoint_steps), [0.0] * len(checkpoint_steps), linestyle="none", marker="|",
                    markersize=12, markeredgewidth=1.5, color="tab:green", transform=ax.get_xaxis_transform(),
                    clip_on=False, label="checkpoint")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    acc_ax.set_xlabel("step")
    if title:
        loss_ax.set_title(title, fontsize="medium")
    try:
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise UserError(f"--out {out}: folder {folder} does not exist")
        figure.savefig(out, format=fmt)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
