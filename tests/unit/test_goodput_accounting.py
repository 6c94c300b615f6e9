"""Goodput accounting on synthetic attempt records, the interval rule, and the flag parsing."""

from __future__ import annotations

import argparse
import math

import pytest

from dist_train.config.job import resolve
from dist_train.errors import UserError
from dist_train.goodput.accounting import CATEGORIES, account
from dist_train.goodput.events import GoodputRecorder, read_records
from dist_train.goodput.interval import Every, Schedule, mtbf_from_history, parse_every, young_daly


def steps(first: int, last: int, t0: float, length: float = 1.0, wait: float = 0.25) -> dict:
    return {"e": "steps", "s": [[s, t0 + (s - first) * length, t0 + (s - first + 1) * length, wait]
                                for s in range(first, last + 1)]}


def three_attempts() -> dict[int, list[dict]]:
    """1: steps 1-10, commits 5 and 10 (preempted, final save); 2: resumes 10, trains 11-20, commits 15, killed;
    3: resumes 15, trains 16-30, finished."""
    return {
        1: [{"e": "start", "t": 0.0, "world": 2}, {"e": "restore", "t0": 2.0, "t1": 2.0, "step": None, "t": 2.0},
            steps(1, 5, 5.0), {"e": "ckpt", "step": 5, "t0": 10.0, "t1": 11.0, "t": 11.0},
            {"e": "commit", "step": 5, "t": 11.0}, steps(6, 10, 11.0),
            {"e": "ckpt", "step": 10, "t0": 16.0, "t1": 17.0, "t": 17.0}, {"e": "commit", "step": 10, "t": 17.0},
            {"e": "exit", "reason": "preempted", "t": 18.0}],
        2: [{"e": "start", "t": 20.0, "world": 1}, {"e": "restore", "t0": 21.0, "t1": 23.0, "step": 10, "t": 23.0},
            steps(11, 15, 24.0), {"e": "ckpt", "step": 15, "t0": 29.0, "t1": 30.0, "t": 30.0},
            {"e": "commit", "step": 15, "t": 30.0}, steps(16, 20, 30.0)],     # SIGKILLed at ~35
        3: [{"e": "start", "t": 40.0, "world": 1}, {"e": "restore", "t0": 41.0, "t1": 42.0, "step": 15, "t": 42.0},
            steps(16, 30, 43.0), {"e": "ckpt", "step": 30, "t0": 58.0, "t1": 59.0, "t": 59.0},
            {"e": "commit", "step": 30, "t": 59.0}, {"e": "exit", "reason": "finished", "t": 60.0}],
    }


def test_categories_sum_to_elapsed_and_lost_work_is_the_killed_attempts_steps_after_its_commit():
    report = account(three_attempts())
    assert report["elapsed_s"] == pytest.approx(60.0)
    assert report["productive_s"] + sum(report["badput_s"].values()) == pytest.approx(report["elapsed_s"])
    assert set(report["badput_s"]) == set(CATEGORIES)
    assert [a["ended"] for a in report["attempts"]] == ["preempted", "killed", "finished"]
    assert [a["steps_trained"] for a in report["attempts"]] == [10, 10, 15]
    assert [a["steps_lost"] for a in report["attempts"]] == [0, 5, 0]
    bad = report["badput_s"]
    assert bad["lost_work"] == pytest.approx(5.0)       # steps 16-20 of attempt 2, 1 s each
    assert bad["downtime"] == pytest.approx((20 - 18) + (40 - 35))
    assert bad["restore"] == pytest.approx(0 + 2 + 1)
    assert bad["checkpoint"] == pytest.approx(4.0)
    assert bad["data_wait"] == pytest.approx(0.25 * 30)  # surviving steps only (10 + 5 + 15)
    assert bad["startup"] == pytest.approx((5 - 0) + (24 - 20 - 2) + (43 - 40 - 1))
    assert report["productive_s"] == pytest.approx(0.75 * 30)
    assert report["goodput"] == pytest.approx(report["productive_s"] / 60.0)


def test_a_run_still_going_counts_to_now_and_loses_nothing_yet():
    records = three_attempts()
    records[3] = records[3][:-1]  # no exit: still running (the newest attempt)
    report = account(records, now=100.0)
    assert report["attempts"][-1]["ended"] == "running" and report["attempts"][-1]["steps_lost"] == 0
    assert report["elapsed_s"] == pytest.approx(100.0)
    assert report["productive_s"] + sum(report["badput_s"].values()) == pytest.approx(100.0)


def test_a_failed_attempt_without_a_successor_loses_what_followed_its_last_commit():
    records = {2: three_attempts()[2] + [{"e": "exit", "reason": "failed", "t": 36.0}]}
    report = account(records)
    assert report["attempts"][0]["ended"] == "failed" and report["attempts"][0]["steps_lost"] == 5


def test_empty_record():
    report = account({})
    assert report["elapsed_s"] == 0 and report["goodput"] == 0 and report["attempts"] == []


def test_local_recorder_round_trip_and_a_torn_line(tmp_path):
    from dist_train.checkpoint.storage import Storage
    storage = Storage(str(tmp_path / "run"))
    recorder = GoodputRecorder(storage, 3, started=1.0)
    recorder.step(1, 2.0, 3.0, 0.5)
    recorder.event("commit", step=1, t=3.5)
    recorder.close("finished")
    with open(tmp_path / "run" / "_goodput" / "g000003.jsonl", "a") as handle:
        handle.write('{"e": "ste')  # cut off by a kill
    events = read_records(storage)[3]
    assert [e["e"] for e in events] == ["start", "steps", "commit", "exit"]
    assert account({3: events})["attempts"][0]["ended"] == "finished"


def test_young_daly_and_the_auto_schedule_within_bounds():
    assert young_daly(2.0, 3600.0) == pytest.approx(math.sqrt(2 * 2 * 3600))
    schedule = Schedule(parse_every("auto"), 60.0, "flag", low=parse_every("10"), high=parse_every("30s"))
    for _ in range(5):
        schedule.observe_step(0.1)
    first = schedule.start(0)
    assert first["mtbf_s"] == 60.0 and first["cost_s"] == 1.0          # the prior cost before any save
    assert first["interval_s"] == pytest.approx(math.sqrt(120.0))
    assert schedule.observe_save(10, 0.01) is not None                  # cheaper saves: a shorter interval
    assert schedule.interval_s == pytest.approx(max(young_daly(schedule.cost, 60.0), 10 * 0.1))
    schedule.observe_save(20, 100.0)
    schedule.observe_save(30, 100.0)
    assert schedule.interval_s == 30.0                                  # the upper bound
    assert schedule.steps_of(schedule.interval_s) == 300


def test_fixed_steps_are_a_function_of_the_step_only():
    schedule = Schedule(Every(steps=4))
    assert [s for s in range(1, 13) if schedule.fixed_due(s)] == [4, 8, 12] and not schedule.timed
    assert Schedule(parse_every("10m")).interval_s == 600.0


def test_mtbf_from_history_uses_a_prior_for_a_new_run():
    assert mtbf_from_history(None) == (3600.0, "prior")
    mtbf, source = mtbf_from_history(account(three_attempts()))
    assert source == "history" and mtbf == pytest.approx((60.0 + 3600.0) / 3)  # 2 interruptions


@pytest.mark.parametrize("key,value", [("checkpoint_every", "0"), ("checkpoint_every", "10x"),
                                       ("checkpoint_every", "-3"), ("mtbf", "-1"), ("mtbf", "10"),
                                       ("checkpoint_every_min", "auto")])
def test_bad_values_are_user_errors(key, value):
    with pytest.raises(UserError, match=key):
        resolve(argparse.Namespace(**{key: value}))


def test_good_values_parse():
    cfg = resolve(argparse.Namespace(checkpoint_every="auto", mtbf="90m", checkpoint_every_min="20",
                                     checkpoint_every_max="2h"))
    assert cfg.checkpoint.checkpoint_every == "auto" and cfg.checkpoint.mtbf == "90m"
    assert parse_every("10m") == Every(seconds=600.0) and parse_every(25) == Every(steps=25)
