"""The bounds of a lingering close (`serving.lingering.Drain`): time in all, time idle, bytes."""

from pipeline.serving.lingering import LINGER_IDLE_S, LINGER_MAX_BYTES, LINGER_S, Drain


def test_a_drain_goes_on_while_data_keeps_coming_within_the_bounds():
    drain = Drain(now=100.0)
    times = [100.0 + step * LINGER_IDLE_S / 2 for step in range(int(2 * LINGER_S / LINGER_IDLE_S))]
    assert all(drain.take(65536, now=now) for now in times)
    assert not drain.over(now=times[-1] + LINGER_IDLE_S / 2)


def test_a_drain_ends_past_its_total_time_even_with_data_flowing():
    drain = Drain(now=0.0)
    for step in range(1, 100):
        if not drain.take(1, now=step * LINGER_IDLE_S / 2):
            break
    assert step * LINGER_IDLE_S / 2 > LINGER_S


def test_a_drain_ends_when_the_client_goes_quiet():
    drain = Drain(now=0.0)
    assert drain.take(10, now=0.5)
    assert not drain.over(now=0.5 + LINGER_IDLE_S - 0.01) and drain.over(now=0.5 + LINGER_IDLE_S + 0.01)


def test_a_drain_ends_past_its_byte_bound():
    drain = Drain(now=0.0)
    assert drain.take(LINGER_MAX_BYTES, now=0.1)
    assert not drain.take(1, now=0.2)
