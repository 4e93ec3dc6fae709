"""The guard against divergence: which state is kept, when training stops (no Ray)."""

from __future__ import annotations

from pipelines.guard import Guard


def test_keeps_the_last_state_while_the_objective_holds():
    guard = Guard(baseline=0.0)
    for step, objective in ((10, 0.5), (20, 0.9), (30, 0.85)):
        decision = guard.update(step, objective, se=0.05, valid_fraction=1.0)
        assert not decision.stop
    kept, why = guard.keep()
    assert kept == "last" and "within two standard errors" in why


def test_returns_the_best_state_when_the_last_is_clearly_worse():
    guard = Guard(baseline=0.0, patience=0)
    guard.update(10, 1.0, se=0.05, valid_fraction=1.0)
    improved = guard.update(20, 2.0, se=0.05, valid_fraction=1.0).improved
    later = guard.update(30, 1.2, se=0.05, valid_fraction=1.0)
    assert improved and not later.improved and not later.stop
    kept, why = guard.keep()
    assert kept == "best" and "step 20" in why


def test_stops_when_the_objective_stays_below_the_base_model():
    guard = Guard(baseline=1.4, patience=3)
    outcomes = [guard.update(step, value, se=0.1, valid_fraction=1.0).stop
                for step, value in ((10, 1.5), (20, -3.0), (30, -5.0), (40, -4.0))]
    assert outcomes == [False, False, False, True]
    assert "below its start (1.4)" in guard.stopped
    assert guard.keep()[0] == "base" and guard.best[2] == 10  # 1.5 is within two standard errors of 1.4
    # within the noise of the start it does not count as below
    calm = Guard(baseline=1.4, patience=1)
    assert not calm.update(10, 1.3, se=0.1, valid_fraction=1.0).stop


def test_stops_when_validity_falls_below_the_floor_and_survives_a_restart():
    guard = Guard(min_valid_fraction=0.93)
    assert not guard.update(10, 1.0, se=0.1, valid_fraction=0.95).stop
    decision = guard.update(20, 1.1, se=0.1, valid_fraction=0.90)
    assert decision.stop and "validity 0.900" in decision.reason
    restored = Guard(min_valid_fraction=0.93)
    restored.load_state_dict(guard.state_dict())
    assert restored.best == guard.best and restored.stopped == guard.stopped


def test_no_objective_or_guard_off_keeps_the_last_state():
    weighted = Guard()
    assert not weighted.update(10, None, se=0.0, valid_fraction=0.1).stop
    assert weighted.keep() == ("last", "no running objective to compare")
    off = Guard(enabled=False, min_valid_fraction=0.9)
    assert not off.update(10, -100.0, se=0.0, valid_fraction=0.0).stop
    assert off.keep() == ("last", "guard off")


def test_returns_the_starting_state_when_nothing_beat_the_base_model():
    guard = Guard(baseline=1.0, patience=0)
    for step, value in ((10, 1.05), (20, 0.9), (30, 1.1)):
        guard.update(step, value, se=0.1, valid_fraction=1.0)
    kept, why = guard.keep()
    assert kept == "base" and "starting state" in why
    clear = Guard(baseline=1.0, patience=0)
    clear.update(10, 1.5, se=0.1, valid_fraction=1.0)
    assert clear.keep()[0] == "last"


def test_a_zero_margin_keeps_any_state_that_beat_the_start():
    """The held-out gain's guard (margin 0): a best window above the start by less than its standard error is
    kept; one that never rose above the start is not."""
    wide = Guard(metric="holdout_gain", baseline=0.0, margin=0.0)
    for step, gain in ((25, 0.03), (50, 0.06), (75, 0.05)):
        wide.update(step, gain, se=0.06, valid_fraction=1.0)
    assert wide.keep()[0] == "last"
    strict = Guard(metric="holdout_gain", baseline=0.0)  # the default margin of two standard errors
    for step, gain in ((25, 0.03), (50, 0.06), (75, 0.05)):
        strict.update(step, gain, se=0.06, valid_fraction=1.0)
    assert strict.keep()[0] == "base"
    never = Guard(metric="holdout_gain", baseline=0.0, margin=0.0, patience=0)
    for step, gain in ((25, -0.01), (50, 0.0), (75, -0.2)):
        never.update(step, gain, se=0.06, valid_fraction=1.0)
    kept, why = never.keep()
    assert kept == "base" and "holdout_gain beat the base model's 0 at all" in why
