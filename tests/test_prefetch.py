"""``model.prefetch.ahead``: the next item is prepared while the caller works on the current one."""

from __future__ import annotations

import threading

import pytest

from model.prefetch import ahead


def test_items_come_in_order_with_their_prepared_values() -> None:
    assert list(ahead([3, 1, 2], lambda x: x * 10)) == [(3, 30), (1, 10), (2, 20)]
    assert list(ahead([], lambda x: x)) == []


def test_the_next_item_is_prepared_while_the_current_one_is_used() -> None:
    started = {k: threading.Event() for k in range(3)}

    def prepare(k: int) -> int:
        started[k].set()
        return k

    seen = []
    for k, _ in ahead([0, 1, 2], prepare):
        if k < 2:  # the consumer blocks here until the helper has begun the next item
            assert started[k + 1].wait(timeout=10), f"item {k + 1} was not prepared ahead"
        seen.append(k)
    assert seen == [0, 1, 2]


def test_a_failed_preparation_is_raised_when_its_item_is_reached() -> None:
    def prepare(k: int) -> int:
        if k == 1:
            raise ValueError("image 1 does not decode")
        return k

    got = ahead([0, 1, 2], prepare)
    assert next(got) == (0, 0)
    with pytest.raises(ValueError, match="image 1 does not decode"):
        next(got)
