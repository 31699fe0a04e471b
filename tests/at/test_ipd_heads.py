"""The per-link-id cache of +IPD heads (format.ipd_active) never goes stale: any sequence of
ids (CIPMUX 0 and 1 mixed), lengths and senders (CIPDINFO off, IPv4, IPv6, another sender of
a mode-2 UDP link) gives the bytes of the uncached formula; the allowance covers every head."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridged.at import format as fmt

_REMOTES = st.one_of(
    st.none(),
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
)
_HEADS = st.tuples(st.one_of(st.none(), st.integers(0, 4)), st.integers(0, 2**32 - 1), _REMOTES)


def _uncached(link_id, length, remote) -> bytes:
    """main's ipd_active, as it was before the cache."""
    head = b"\r\n+IPD," + (b"" if link_id is None else b"%d," % link_id) + b"%d" % length
    if remote is not None:
        head += b',"' + remote[0].encode("ascii") + b'",%d' % remote[1]
    return head + b":"


@settings(max_examples=300, deadline=None)
@given(st.lists(_HEADS, min_size=1, max_size=30))
def test_cached_heads_are_the_uncached_bytes_in_any_order(heads):
    """Each head, after any others, equals the uncached formula and fits IPD_HEAD_MAX."""
    for link_id, length, remote in heads:
        head = fmt.ipd_active(link_id, length, remote)
        assert head == _uncached(link_id, length, remote)
        assert len(head) <= fmt.IPD_HEAD_MAX
