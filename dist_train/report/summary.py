"""The numbers a person looks at first after a run: steps, attempts, checkpoints, best validation, speed."""

from __future__ import annotations

import statistics
from typing import Any

from dist_train.checkpoint import catalog
from dist_train.report.history import History


def summarize(history: History, checkpoints: list[catalog.Verdict], folders: int) -> dict[str, Any]:
    """JSON-friendly; `format_summary` turns it into the terminal lines."""
    train, val = history.points["train"], history.points["val"]
    records = train + val
    last = max(records, key=lambda r: r["step"]) if records else None
    summary: dict[str, Any] = {
        "steps": last["step"] if last else 0,
        "epoch": last.get("epoch") if last else None,
        "attempts": len(set(history.generations) | {v.ref.generation for v in checkpoints})
        or (1 if records else 0),
        "resumes": [{"step": r.step, "generation": r.generation, "from": r.from_generation}
                    for r in history.resumes],
        "checkpoints": len(checkpoints), "checkpoint_folders": folders,
        "epochs_done": None, "newest_checkpoint": None, "train": None, "val": None, "samples_per_sec": None,
        "skipped_lines": history.skipped_lines,
    }
    if checkpoints:
        newest = max(checkpoints, key=lambda v: v.ref)
        summary["newest_checkpoint"] = {"url": newest.url, "step": newest.ref.step,
                                        "epoch": (newest.manifest or {}).get("epoch")}
        summary["steps"] = max(summary["steps"], newest.ref.step)
        summary["epochs_done"] = (newest.manifest or {}).get("epoch")
    if train:
        summary["train"] = {"last_step": train[-1]["step"], "last_loss": train[-1].get("loss"),
                            "last_accuracy": train[-1].get("accuracy")}
    finite_val = [r for r in val if isinstance(r.get("loss"), (int, float))]
    if finite_val:
        best_loss = min(finite_val, key=lambda r: (r["loss"], r["step"]))
        best_acc = max(finite_val, key=lambda r: (r.get("accuracy") or 0.0, -r["step"]))
        summary["val"] = {"evaluations": len(val), "best_loss": best_loss["loss"], "best_loss_step": best_loss["step"],
                          "accuracy_at_best_loss": best_loss.get("accuracy"),
                          "best_accuracy": best_acc.get("accuracy"), "best_accuracy_step": best_acc["step"],
                          "last_loss": val[-1].get("loss"), "last_accuracy": val[-1].get("accuracy"),
                          "last_step": val[-1]["step"]}
    rates = [r["samples_per_sec"] for r in train
             if isinstance(r.get("samples_per_sec"), (int, float)) and r["samples_per_sec"] > 0]
    if rates:
        summary["samples_per_sec"] = {"median": statistics.median(rates), "max": max(rates)}
    return summary


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def format_summary(run_url: str, summary: dict[str, Any]) -> list[str]:
    lines = [f"run {run_url}"]
    epochs = summary.get("epochs_done")
    done = f" ({epochs} epoch(s) done)" if epochs is not None else ""
    lines.append(f"  steps            {summary['steps']}{done}")
    resumes = summary["resumes"]
    text = f"  attempts         {summary['attempts']}"
    if resumes:
        text += " (resumed at step " + ", ".join(str(r["step"]) for r in resumes) + ")"
    lines.append(text)
    newest = summary["newest_checkpoint"]
    text = f"  checkpoints      {summary['checkpoints']} committed"
    if summary["checkpoint_folders"] > summary["checkpoints"]:
        text += f" ({summary['checkpoint_folders'] - summary['checkpoints']} invalid folder(s))"
    if newest:
        text += f"; newest at step {newest['step']}: {newest['url']}"
    lines.append(text)
    train, val = summary["train"], summary["val"]
    if train:
        lines.append(f"  train            loss {_num(train['last_loss'])}  accuracy {_num(train['last_accuracy'])}"
                     f"  (step {train['last_step']})")
    if val:
        lines.append(f"  best val loss    {_num(val['best_loss'])} at step {val['best_loss_step']}"
                     f" (accuracy {_num(val['accuracy_at_best_loss'])})")
        lines.append(f"  best val acc     {_num(val['best_accuracy'])} at step {val['best_accuracy_step']}")
        lines.append(f"  last val         loss {_num(val['last_loss'])}  accuracy {_num(val['last_accuracy'])}"
                     f"  (step {val['last_step']})")
    rate = summary["samples_per_sec"]
    if rate:
        lines.append(f"  samples/s        {rate['median']:.0f} median, {rate['max']:.0f} max (all ranks)")
    if summary["skipped_lines"]:
        lines.append(f"  ({summary['skipped_lines']} unreadable metrics line(s) skipped)")
    return lines


def format_goodput(report: dict[str, Any]) -> list[str]:
    """The goodput lines: the share that trained, where the rest went, how each attempt ended."""
    if not report.get("attempts"):
        return ["  goodput          n/a (no goodput record in this run dir: trained before dist_train recorded one)"]
    elapsed = report["elapsed_s"]
    lines = [f"  goodput          {report['goodput']:.1%} ({report['productive_s']:.1f}s productive of "
             f"{elapsed:.1f}s elapsed)"]
    badput = sorted(report["badput_s"].items(), key=lambda kv: -kv[1])
    lines.append("  badput           " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in badput if seconds >= 0.05)
                 or "  badput           none")
    for attempt in report["attempts"]:
        lost = f", {attempt['steps_lost']} lost" if attempt["steps_lost"] else ""
        resumed = f", from step {attempt['resumed_step']}" if attempt.get("resumed_step") is not None else ""
        lines.append(f"  attempt {attempt['generation']:<8} {attempt['ended']}: {attempt['steps_trained']} steps"
                     f"{lost}{resumed} ({attempt['end'] - attempt['start']:.1f}s, "
                     f"{attempt.get('world_size') or '?'} ranks)")
    return lines
