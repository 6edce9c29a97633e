"""How many jobs a worker claims: Little's law on its measured stage times."""

from __future__ import annotations

import math

from workers.demand import Demand


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def measured(call_s: float, away_s: float) -> Demand:
    """One image a call taking `call_s`; one job came back after `away_s`."""
    clock = Clock()
    demand = Demand(max_batch=1, clock=clock)
    demand.call_done(1, call_s)
    demand.left_generator("job", requests=1)
    clock.now += away_s
    demand.back_at_generator("job")
    return demand


def test_with_nothing_measured_it_asks_for_one_batch_running_and_one_queued() -> None:
    assert Demand(max_batch=4).jobs_needed() == 8
    assert Demand(max_batch=1).jobs_needed() == 2


def test_a_critique_thirty_generations_long_needs_thirty_jobs_away_and_more() -> None:
    demand = measured(call_s=0.1, away_s=3.0)
    # b/k x (t + away)/t + b/k = 1 x 3.1/0.1 + 1: the fixed 16 jobs would leave it idle half the time.
    assert demand.jobs_needed() == math.ceil(3.1 / 0.1 + 1)


def test_the_count_grows_while_the_first_jobs_are_still_away() -> None:
    clock = Clock()
    demand = Demand(max_batch=1, clock=clock)
    demand.call_done(1, 0.1)
    demand.left_generator("first", requests=1)
    before = demand.jobs_needed()
    clock.now += 1.0
    assert demand.jobs_needed() > before + 5, "no job came back yet: the longest away stands in"
    demand.gone("first")
    assert demand.jobs_needed() == before, "a job that ended is not away"


def test_a_batch_of_requests_a_round_needs_fewer_jobs() -> None:
    clock = Clock()
    demand = Demand(max_batch=8, clock=clock)
    demand.call_done(8, 0.5)
    demand.left_generator("job", requests=4)  # four candidates a round: a job fills half a call
    clock.now += 2.0
    demand.back_at_generator("job")

    per_call = 8 / 4
    assert demand.jobs_needed() == math.ceil(per_call * (0.5 + 2.0) / 0.5 + per_call)


def test_a_full_calls_time_is_extrapolated_from_the_largest_batch_measured() -> None:
    demand = Demand(max_batch=8)
    demand.call_done(2, 0.5)
    demand.call_done(4, 0.8)
    assert demand.call_seconds() == 0.8 * 8 / 4
    demand.call_done(8, 1.2)
    assert demand.call_seconds() == 1.2


def test_what_the_critique_limit_admits_bounds_the_count() -> None:
    demand = measured(call_s=0.1, away_s=3.0)
    # Four critiques at once, one job ready to take the next free place: a sixth would only wait.
    assert demand.jobs_needed(critic_limit=4) == 5
    assert demand.jobs_needed(critic_limit=400) == demand.jobs_needed()
