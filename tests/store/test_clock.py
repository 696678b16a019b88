"""Trusted time with bounds (SPEC §5): network time only inside a plausibility window,
the floor only from time two sources agree on, a poisoned floor repaired at open."""

import time

import pytest

from agent.core.clock import AGREE_SLACK, BUILD_EPOCH, MAX_DRIFT, Clock
from agent.core.store import TIME_FLOOR_KEY, Store

YEAR = 365 * 86_400.0
NOW = time.time()


def no_ntp() -> Clock:
    return Clock(kernel_synchronised=lambda: False)


def test_network_time_before_the_build_date_or_the_floor_is_rejected():
    clock = no_ntp()
    assert "before the build date" in clock.offer_network_time(BUILD_EPOCH - 86_400, None)
    assert "before the trusted floor" in clock.offer_network_time(NOW - 3600, NOW)
    assert not clock.now().trusted


def test_the_first_network_time_of_a_boot_may_not_leap_years_past_the_floor():
    clock = no_ntp()
    assert "too far past" in clock.offer_network_time(BUILD_EPOCH + 73 * YEAR, None)  # 2099
    assert clock.offer_network_time(NOW, None) is None
    assert clock.now().trusted and abs(clock.now().wall - NOW) < 5


def test_once_trusted_network_time_moves_it_only_a_little():
    clock = no_ntp()
    assert clock.offer_network_time(NOW, None) is None
    assert "from the trusted time" in clock.offer_network_time(NOW + 86_400, None)
    assert clock.offer_network_time(NOW + MAX_DRIFT / 2, None) is None


@pytest.mark.parametrize("step", [MAX_DRIFT - 1, -(MAX_DRIFT - 1)], ids=["forward", "backward"])
def test_network_time_cannot_creep_in_steps_under_max_drift(step):
    """A rogue cell repeats +CTZE, each time just under MAX_DRIFT from the last: every step is
    held to the first network time of the boot, so the trusted time never walks away (it
    walked 25 h in 300 steps, expiring every valid token or reviving expired ones)."""
    clock, now = no_ntp(), time.time()  # not NOW: that is the import's time, seconds old in a long run
    assert clock.offer_network_time(now, None) is None
    forged, refused = now, 0
    for _ in range(300):
        forged += step
        refused += clock.offer_network_time(forged, None) is not None
    assert refused == 299  # only the first step is inside the window
    assert clock.now().trusted and abs(clock.now().wall - time.time()) <= MAX_DRIFT


def test_a_monotonic_clock_that_drifts_over_months_still_takes_the_networks_time(monkeypatch):
    """The monotonic clock drifts too (here 100 ppm slow: 8.6 s a day, 518 s in 60 days, past
    MAX_DRIFT): the window around the first network time widens at MAX_RATE, so daily network
    time is taken all along."""
    mono = [1_000.0]
    monkeypatch.setattr(Clock, "monotonic", staticmethod(lambda: mono[0]))
    clock = no_ntp()
    assert clock.offer_network_time(NOW, None) is None
    for day in range(1, 61):
        mono[0] = 1_000.0 + day * 86_400 * (1 - 100e-6)
        assert clock.offer_network_time(NOW + day * 86_400, None) is None, day
    assert clock.now().wall == pytest.approx(NOW + 60 * 86_400, abs=1)
    assert clock.offer_network_time(NOW + 60 * 86_400 + MAX_DRIFT * 3, None) is not None


def test_a_wrong_first_network_time_that_ntp_corrected_is_not_held_against_right_ones(monkeypatch):
    """The boot's first network time is an hour off (no NTP yet); NTP then syncs, network
    time is taken against it; NTP is lost. Right network times must still be taken (held to
    the wrong first one, each was refused for the rest of the process)."""
    t, mono, ntp = 1_800_000_000.0, [1_000.0], [False]
    monkeypatch.setattr(Clock, "monotonic", staticmethod(lambda: mono[0]))
    clock = Clock(kernel_synchronised=lambda: ntp[0], wall=lambda: t + mono[0], build_epoch=t - 86_400)
    assert clock.offer_network_time(t + mono[0] + 3600, None) is None  # the first of the boot, 1 h off
    ntp[0], mono[0] = True, mono[0] + 600
    assert clock.offer_network_time(t + mono[0], None) is None  # taken against NTP
    ntp[0], mono[0] = False, mono[0] + 60
    assert clock.offer_network_time(t + mono[0], None) is None


def test_ntp_wins_and_agreement_makes_a_stamp_agreed():
    clock = Clock(kernel_synchronised=lambda: True)
    assert not clock.now().agreed  # one source
    assert "from the trusted time" in clock.offer_network_time(time.time() + 3600, None)
    assert not clock.now().agreed
    assert clock.offer_network_time(time.time() + AGREE_SLACK / 2, None) is None
    assert clock.now().agreed and clock.now().trusted


def test_only_agreed_time_raises_the_floor(tmp_path):
    clock = no_ntp()
    clock.offer_network_time(NOW, None)
    store = Store.open(tmp_path, clock=clock)
    store.record("agent_started", {})
    assert store.read().time_floor() is None  # network time alone
    synced = Clock(kernel_synchronised=lambda: True)
    synced.offer_network_time(time.time(), None)
    store.clock = synced
    store.record("agent_started", {})
    assert store.read().time_floor() == pytest.approx(time.time(), abs=5)
    store.close()


@pytest.mark.parametrize("ntp", [False, True])
def test_a_poisoned_floor_is_repaired_at_open(tmp_path, ntp):
    store = Store.open(tmp_path, clock=no_ntp())
    with store.transaction() as tx:
        tx.set_meta(TIME_FLOOR_KEY, BUILD_EPOCH + 73 * YEAR)  # what one forged +CTZE did before
    store.close()
    store = Store.open(tmp_path, clock=Clock(kernel_synchronised=lambda: ntp))
    floor = store.read().time_floor()
    assert floor == (pytest.approx(time.time(), abs=AGREE_SLACK + 5) if ntp else BUILD_EPOCH)
    (repair,) = [e["data"] for e, _ in store.evidence_entries() if e["type"] == "time_floor_repaired"]
    assert repair["was"] == BUILD_EPOCH + 73 * YEAR
    store.close()
    store = Store.open(tmp_path, clock=no_ntp())  # a plausible floor is left alone
    assert [e["type"] for e, _ in store.evidence_entries()].count("time_floor_repaired") == 1
    store.close()
