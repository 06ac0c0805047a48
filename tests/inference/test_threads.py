"""The decode thread tuner: picks the count that is fastest now, notices load arriving, stays out
of the way when the user fixed the count; and `generate` gives the same tokens with it."""

import pytest
import torch

from moge.inference.generate import generate
from moge.inference.threads import FixedThreads, ThreadTuner, decode_threads, thread_candidates
from models import make_model


class FakeMachine:
    """A clock and a thread setter: a step at n threads takes cost[n] seconds of fake time."""

    def __init__(self, cost):
        self.cost, self.now, self.threads, self.sets = dict(cost), 0.0, None, []

    def set_threads(self, n):
        self.threads = n
        self.sets.append(n)

    def clock(self):
        return self.now

    def step(self):
        self.now += self.cost[self.threads]
        return self.threads


def _tuner(machine, **kw):
    return ThreadTuner(2, set_threads=machine.set_threads, clock=machine.clock, **kw)


def test_candidates():
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(6) == [1, 2, 4, 6]
    assert thread_candidates(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("cost, best", [({1: 1.0, 2: 0.6}, 2), ({1: 0.5, 2: 2.0}, 1)])
def test_the_faster_count_wins_the_probe_and_runs_afterwards(cost, best):
    m = FakeMachine(cost)
    tuner = _tuner(m, probe_steps=3, period=50)
    ran = [tuner.run(m.step) for _ in range(40)]
    assert tuner.choice == best
    assert ran[8:] == [best] * 32  # 2 candidates x (3 timed + 1 warm-up) steps of probing, then the winner
    assert tuner.summary()["probes"] == 1


def test_the_first_step_after_a_switch_is_not_timed():
    m = FakeMachine({1: 1.0, 2: 0.6})
    tuner = _tuner(m, probe_steps=2, period=50)
    original = m.step

    def slow_first_after_switch():
        out = original()
        if len(m.sets) and tuner.used[m.threads] == 0:
            m.now += 100.0  # a pool start-up cost on the first step at a new count
        return out

    for _ in range(10):
        tuner.run(slow_first_after_switch)
    assert tuner.choice == 2


def test_load_arriving_triggers_an_early_probe_and_a_switch():
    m = FakeMachine({1: 1.0, 2: 0.6})
    tuner = _tuner(m, probe_steps=3, period=1000)
    for _ in range(20):
        tuner.run(m.step)
    assert tuner.choice == 2
    m.cost = {1: 1.1, 2: 4.0}  # another process takes a core: two threads now wait at every barrier
    for _ in range(20):
        tuner.run(m.step)
    assert tuner.choice == 1 and tuner.summary()["probes"] == 2
    assert [tuner.run(m.step) for _ in range(5)] == [1] * 5


def test_periodic_probe_finds_cores_freed_again():
    m = FakeMachine({1: 1.0, 2: 3.0})
    tuner = _tuner(m, probe_steps=2, period=10)
    for _ in range(12):
        tuner.run(m.step)
    assert tuner.choice == 1
    m.cost = {1: 1.0, 2: 0.5}  # idle again: 1 thread does not get slower, only the probe can tell
    for _ in range(30):
        tuner.run(m.step)
    assert tuner.choice == 2


def test_one_core_never_probes():
    m = FakeMachine({1: 1.0})
    tuner = ThreadTuner(1, set_threads=m.set_threads, clock=m.clock)
    assert [tuner.run(m.step) for _ in range(5)] == [1] * 5
    assert m.sets == [1]


def test_fixed_threads_and_devices():
    before = torch.get_num_threads()
    try:
        fixed = decode_threads(1)
        assert isinstance(fixed, FixedThreads) and torch.get_num_threads() == 1
        assert fixed.run(lambda: 7) == 7 and fixed.summary()["steps_by_threads"] == {"1": 1}
        assert isinstance(decode_threads("auto", "meta"), FixedThreads)  # not a CPU: nothing to tune
        assert isinstance(decode_threads("auto"), ThreadTuner)
    finally:
        torch.set_num_threads(before)


def test_generate_with_the_tuner_gives_the_same_tokens():
    before = torch.get_num_threads()
    try:
        model = make_model(seed=3)
        prompts = [[5, 6, 7, 8], [9, 10]]
        plain = generate(model, prompts, max_new_tokens=24)
        tuned = generate(model, prompts, max_new_tokens=24, threads=ThreadTuner(2, probe_steps=2, period=8))
        assert tuned.tokens == plain.tokens
        assert sum(tuned.threads["steps_by_threads"].values()) == tuned.decode_steps
    finally:
        torch.set_num_threads(before)


def test_threads_flag_is_validated():
    from moge.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--model", "unused", "--token-ids", "1", "--threads", "0"])
