"""FaultPlan: seeded draws, schedules, per-byte gaps and faults on demand, without a clock."""

from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.faults import FaultPlan, Where, parse_demand, parse_spec


def plan(*specs, seed=1, where=Where.FRONT, scope="front", link=None, reports=None):
    report = (lambda name, details: reports.append((name, details))) if reports is not None else None
    return FaultPlan([parse_spec(n, t) for n, t in specs], seed, where=where, scope=scope, start=100.0,
                     link=link, report=report)


def draws(p, name, n, now=100.0):
    return [p.hit(name, now) is not None for _ in range(n)]


def test_nothing_configured_hits_nothing():
    """An empty plan is off for every kind (the hot paths' one question)."""
    p = plan()
    assert not p.enabled("at_busy")
    assert p.hit("at_busy", 100.0) is None
    assert p.condition("net_latency", 100.0) is None
    assert p.due(1e9) == [] and p.next_deadline() is None


def test_a_rate_hits_about_that_share_of_occasions():
    """rate = 0.2 over 5000 commands hits close to 1000 of them."""
    hits = sum(draws(plan(("at_busy", {"rate": 0.2})), "at_busy", 5000))
    assert 850 < hits < 1150


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), rate=st.floats(0.01, 0.99), n=st.integers(1, 300))
def test_the_same_seed_gives_the_same_sequence(seed, rate, n):
    """Two plans with the same seed and the same occasions hit the same occasions."""
    a = plan(("at_busy", {"rate": rate}), seed=seed)
    b = plan(("at_busy", {"rate": rate}), seed=seed)
    assert draws(a, "at_busy", n) == draws(b, "at_busy", n)


def test_another_seed_gives_another_sequence():
    """The seed matters: 200 draws at rate 0.5 differ between seeds 1 and 2."""
    assert draws(plan(("at_busy", {"rate": 0.5}), seed=1), "at_busy", 200) != \
        draws(plan(("at_busy", {"rate": 0.5}), seed=2), "at_busy", 200)


def test_each_fault_draws_from_a_stream_of_its_own():
    """Adding another fault, drawn in between, does not change the first fault's sequence."""
    alone = plan(("at_busy", {"rate": 0.5}))
    both = plan(("at_busy", {"rate": 0.5}), ("at_errcode", {"rate": 0.5}))
    seq_alone = draws(alone, "at_busy", 100)
    seq_both = []
    for _ in range(100):
        seq_both.append(both.hit("at_busy", 100.0) is not None)
        both.hit("at_errcode", 100.0)
    assert seq_alone == seq_both


def test_each_link_draws_from_a_stream_of_its_own():
    """Workers of different links with the same seed do not fail in lockstep."""
    spec = ("net_connect_refused", {"rate": 0.5})
    a = plan(spec, where=Where.WORKER, scope="link0", link=0)
    b = plan(spec, where=Where.WORKER, scope="link1", link=1)
    assert draws(a, "net_connect_refused", 100) != draws(b, "net_connect_refused", 100)


def test_a_plan_keeps_only_its_processes_kinds_and_links():
    """The front ignores worker kinds; a worker ignores faults aimed at another link."""
    specs = (("at_busy", {"rate": 1}), ("net_udp_loss", {"rate": 1, "link": 3}))
    assert set(plan(*specs).specs) == {"at_busy"}
    assert set(plan(*specs, where=Where.WORKER, scope="link3", link=3).specs) == {"net_udp_loss"}
    assert set(plan(*specs, where=Where.WORKER, scope="link2", link=2).specs) == set()


def test_a_schedule_opens_windows_and_hits_every_occasion_inside():
    """at 10, for 2, every 5: active at 10..12, 15..17, ...; never before 10 (times from start)."""
    p = plan(("at_busy", {"at": 10, "for": 2, "every": 5}))
    active = [t for t in range(0, 30) if p.hit("at_busy", 100.0 + t + 0.5)]
    assert active == [10, 11, 15, 16, 20, 21, 25, 26]


def test_rate_and_schedule_together_draw_only_inside_the_window():
    """Outside the window nothing is drawn, so the stream is not moved."""
    p = plan(("at_busy", {"rate": 0.5, "at": 50}))
    q = plan(("at_busy", {"rate": 0.5, "at": 50}))
    for _ in range(100):
        assert p.hit("at_busy", 120.0) is None  # before the window: no draw
    assert draws(p, "at_busy", 50, now=160.0) == draws(q, "at_busy", 50, now=160.0)


def test_scheduled_events_are_due_at_each_window_start():
    """wifi_drop at 5 every 10: due at 5, 15, 25 (once each), with the kind's parameters."""
    p = plan(("wifi_drop", {"at": 5, "every": 10, "duration_ms": 1500}))
    assert p.next_deadline() == 105.0
    fired = []
    for t in range(0, 30):
        for name, params in p.due(100.0 + t):
            fired.append((t, name, params["duration_ms"]))
    assert fired == [(5, "wifi_drop", 1500.0), (15, "wifi_drop", 1500.0), (25, "wifi_drop", 1500.0)]


def test_a_late_tick_fires_a_missed_event_once_not_a_burst():
    """A process that was busy for three periods gets one event, then the next on schedule."""
    p = plan(("at_reset", {"at": 0, "every": 10}))
    assert len(p.due(100.0)) == 1
    assert len(p.due(135.0)) == 1
    assert p.next_deadline() == 140.0


def test_a_process_forked_again_does_not_repeat_past_event_windows():
    """A front forked again at 117 s (resume_at): the one-shot reset at 5 s stays done, the periodic
    drop comes at its next window (125), a random reset after 117."""
    specs = [parse_spec("at_reset", {"at": 5}), parse_spec("wifi_drop", {"at": 5, "every": 10})]
    p = FaultPlan(specs, 1, where=Where.FRONT, scope="front", start=100.0, resume_at=117.0)
    assert p.next_deadline() == 125.0
    assert [name for name, _ in p.due(125.0)] == ["wifi_drop"]
    assert p.next_deadline() == 135.0
    fresh = FaultPlan(specs, 1, where=Where.FRONT, scope="front", start=100.0)
    assert fresh.next_deadline() == 105.0
    rated = FaultPlan([parse_spec("at_reset", {"rate": 1})], 1, where=Where.FRONT, scope="front", start=100.0,
                      resume_at=117.0)
    assert rated.next_deadline() > 117.0


def test_random_events_come_at_about_their_rate():
    """at_reset rate 0.5/s over 1000 s gives close to 500 events, and the same ones for the same seed."""
    def times(seed):
        p = plan(("at_reset", {"rate": 0.5}), seed=seed)
        out, now = [], 100.0
        while now < 1100.0:
            now = p.next_deadline()
            out += [now for _ in p.due(now)]
        return out
    first = times(4)
    assert 420 < len(first) < 580
    assert times(4) == first


def test_a_byte_gap_matches_the_rate():
    """The mean gap at rate 0.01 is about 100 bytes; rate 1 hits every byte; a schedule alone too."""
    p = plan(("uart_corrupt", {"rate": 0.01}))
    gaps = [p.gap("uart_corrupt") for _ in range(3000)]
    assert min(gaps) >= 1 and 85 < sum(gaps) / len(gaps) < 115
    assert plan(("uart_drop", {"rate": 1})).gap("uart_drop") == 1
    assert plan(("uart_drop", {"at": 0})).gap("uart_drop") == 1
    assert plan().gap("uart_drop") >= 1 << 60


def test_the_end_of_a_gap_does_not_draw_the_rate_again():
    """hit(rate_drawn=True) only checks the window, so a gap's hit is not thinned twice."""
    p = plan(("uart_drop", {"rate": 0.001}))
    assert all(p.hit("uart_drop", 100.0, rate_drawn=True) is not None for _ in range(20))


def test_a_condition_holds_while_its_window_is_open():
    """net_latency for 3 s from 1 s: parameters at 2 s, None at 5 s."""
    p = plan(("net_latency", {"at": 1, "for": 3, "ms": 80}), where=Where.WORKER, scope="link0", link=0)
    assert p.condition("net_latency", 102.0)["ms"] == 80.0
    assert p.condition("net_latency", 105.0) is None


def test_a_demand_arms_the_next_occasions_then_disarms():
    """`bridged fault at_busy count=2` hits the next two commands and no more."""
    p = plan()
    assert p.demand(parse_demand("at_busy", {"count": "2"}), 100.0)
    assert p.enabled("at_busy")
    assert draws(p, "at_busy", 4) == [True, True, False, False]
    assert not p.enabled("at_busy")


def test_a_demand_beats_the_configured_rate_then_leaves_it_in_place():
    """An armed fault hits at once even with rate 0; the configured fault stays afterwards."""
    p = plan(("at_busy", {"rate": 0.0}))
    p.demand(parse_demand("at_busy", {}), 100.0)
    assert draws(p, "at_busy", 3) == [True, False, False]
    assert p.enabled("at_busy")


def test_a_demanded_condition_lasts_for_its_duration():
    """net_latency for=2 is in force for two seconds from the demand, with the given ms."""
    p = plan(where=Where.WORKER, scope="link0", link=0)
    p.demand(parse_demand("net_latency", {"ms": "300", "for": "2"}), 100.0)
    assert p.condition("net_latency", 101.9)["ms"] == 300.0
    assert p.condition("net_latency", 102.1) is None
    assert not p.enabled("net_latency")


def test_a_demanded_event_is_left_to_the_caller():
    """Events (a reset, a Wi-Fi drop) happen when demanded: demand() says so by returning False."""
    assert plan().demand(parse_demand("at_reset", {}), 100.0) is False


def test_fired_counts_and_reports():
    """Every injected fault is counted and handed to the process's report (log, status, transcript)."""
    reports = []
    p = plan(reports=reports)
    p.fired("at_busy", command="AT+CIPSEND")
    p.fired("at_busy", command="AT")
    assert p.counts == {"at_busy": 2}
    assert reports == [("at_busy", {"command": "AT+CIPSEND"}), ("at_busy", {"command": "AT"})]
