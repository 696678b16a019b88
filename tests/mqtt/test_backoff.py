import pytest

from agent.core.backoff import Backoff


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_ceiling_doubles_from_1_s_to_120_s():
    backoff = Backoff(random=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(10)] == [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]


@pytest.mark.parametrize("draw, expected", [
    (0.0, [0.0, 0.0, 0.0]),
    (0.5, [0.5, 1.0, 2.0]),
    (0.25, [0.25, 0.5, 1.0]),
])
def test_full_jitter_scales_the_ceiling(draw, expected):
    backoff = Backoff(random=lambda: draw)
    assert [backoff.next_delay() for _ in range(3)] == expected


@pytest.mark.parametrize("connected_for, next_ceiling", [
    (0.0, 8),      # dropped at once: keep growing
    (29.9, 8),     # not yet stable
    (30.0, 1),     # stable for 30 s: start over
    (600.0, 1),
])
def test_reset_only_after_30_s_of_stable_connection(connected_for, next_ceiling):
    clock = FakeClock()
    backoff = Backoff(random=lambda: 1.0, clock=clock)
    for _ in range(3):
        backoff.next_delay()  # ceilings 1, 2, 4 used; next is 8
    backoff.connected()
    clock.now += connected_for
    backoff.disconnected()
    assert backoff.next_delay() == next_ceiling


def test_a_failed_attempt_without_connection_never_resets():
    clock = FakeClock()
    backoff = Backoff(random=lambda: 1.0, clock=clock)
    backoff.next_delay()
    clock.now += 3600
    backoff.disconnected()  # no connected() before: a connect attempt that failed
    assert backoff.next_delay() == 2


def test_delays_stay_within_the_ceiling_with_real_randomness():
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0 <= d <= 120 for d in delays)
    assert len(set(delays)) > 150  # jittered, not synchronised


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        Backoff(base=10, cap=1)
