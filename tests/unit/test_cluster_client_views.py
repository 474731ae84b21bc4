"""Which arbiter view the client keeps as the newest, when a held watch and heartbeats both answer."""

from tidal.cluster.client import _Pending, _stale
from tidal.cluster.model import Allocation, GrantView


def view(h100: int, generation: int) -> GrantView:
    return GrantView("job", Allocation.of({"H100": h100}), generation=generation)


def test_a_reply_fired_before_the_watched_view_arrived_and_older_than_it_is_stale():
    p = _Pending(fired_s=10.0, latest=view(3, generation=7), watched_s=10.2)
    assert _stale(view(4, generation=6), p)  # the heartbeat left before the shrink: keep the shrink


def test_a_reply_as_new_as_the_watched_view_or_newer_replaces_it():
    p = _Pending(fired_s=10.0, latest=view(3, generation=7), watched_s=10.2)
    assert not _stale(view(3, generation=7), p)
    assert not _stale(view(2, generation=8), p)


def test_a_reply_fired_after_the_watched_view_arrived_wins_even_with_a_lower_generation():
    # An arbiter restored from an older state counts its generations from there.
    p = _Pending(fired_s=10.5, latest=view(3, generation=7), watched_s=10.2)
    assert not _stale(view(4, generation=2), p)


def test_without_a_watched_view_every_reply_is_taken():
    assert not _stale(view(4, generation=1), _Pending(fired_s=10.0, latest=view(4, generation=9)))
