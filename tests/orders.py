"""Orders checked to a tolerance.

Two computations of one score (btsearch's and transformers', FAISS and a brute force, a batch
and one item alone, float32 and float16 states, one CPU's kernels and another's) agree to a
tolerance, not to the bit. So two items whose scores are closer than that tolerance may come
out in either order, and which one a CPU puts first is luck. These helpers accept exactly those
swaps: an order that passes over an item better by more than the tolerance still fails, and
where every gap exceeds the tolerance they are the exact comparisons.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np


def assert_ranked_by(ranked: Sequence[Hashable], scores: Mapping[Hashable, float], atol: float, what: str = "") -> None:
    """`ranked` (best first, each once) is a ranking by `scores` up to `atol`: each item scores
    within `atol` of the best item not ranked before it. `scores` holds every item that could
    rank (more than `ranked` when `ranked` is a top-k: then it is also the right top-k)."""
    assert len(set(ranked)) == len(ranked), f"{what}: an item ranked twice in {list(ranked)}"
    left = dict(scores)
    for position, item in enumerate(ranked, start=1):
        assert item in left, f"{what}: #{position} {item!r} is not one of {list(scores)}"
        best = max(left, key=left.__getitem__)
        assert left[item] >= left[best] - atol, (
            f"{what}: #{position} is {item!r} ({left[item]!r}) while {best!r} scores {left[best]!r}, more than {atol} above it"
        )
        del left[item]


def assert_top(chosen: Sequence[Hashable], scores: Mapping[Hashable, float], atol: float, what: str = "") -> None:
    """`chosen` is the top len(chosen) of `scores` up to `atol`: none of the others scores more
    than `atol` above any chosen item (near the cut, either of two close items may be chosen)."""
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(scores), f"{what}: {list(chosen)} are not distinct items of {list(scores)}"
    others = [item for item in scores if item not in set(chosen)]
    if chosen and others:
        worst = min(chosen, key=scores.__getitem__)
        best = max(others, key=scores.__getitem__)
        assert scores[worst] >= scores[best] - atol, f"{what}: {worst!r} ({scores[worst]!r}) chosen over {best!r} ({scores[best]!r})"


def tie_resolutions(row: Sequence[float], atol: float, limit: int = 5040) -> Iterator[np.ndarray]:
    """Score vectors, one for each order in which `row` may come out when values within `atol`
    of each other (chained: a, b, c with a~b and b~c are one group) may be swapped; the order of
    values further apart is kept. Without such values, `row` itself alone."""
    row = np.asarray(row, dtype=np.float64)
    order = np.argsort(-row, kind="stable")
    groups, current = [], [int(order[0])] if len(order) else []
    for previous, item in zip(order, order[1:]):
        if row[previous] - row[item] <= atol:
            current.append(int(item))
        else:
            groups.append(current)
            current = [int(item)]
    if current:
        groups.append(current)
    close = [group for group in groups if len(group) > 1]
    assert math.prod(math.factorial(len(group)) for group in close) <= limit, f"too many near-ties to try: {close}"
    for arrangement in itertools.product(*(itertools.permutations(group) for group in close)):
        keys = row.copy()
        for group in arrangement:
            top = max(row[list(group)])
            for place, item in enumerate(group):  # distinct values, as close to the group as it is to itself
                keys[item] = top - place * atol / (4 * len(group))
        yield keys


def protocol_order(itc: Sequence[float], rerank: Sequence[float] | None, candidates: int) -> list[int]:
    """The re-ranking protocol spelt out for one query: its top `candidates` by ITC (ties: lower
    index first) sorted by the re-rank score (ties: ITC order), then the rest in ITC order."""
    by_itc = sorted(range(len(itc)), key=lambda j: (-itc[j], j))
    if rerank is None or candidates == 0:
        return by_itc
    head = by_itc[:candidates]
    return sorted(head, key=lambda j: (-rerank[j], head.index(j))) + by_itc[candidates:]


def possible_orders(
    itc: Sequence[float], rerank: Sequence[float] | None, candidates: int, atol: float, rerank_atol: float | None = None
) -> set[tuple[int, ...]]:
    """Every `protocol_order` the query may get when its ITC scores are known to `atol`, and its
    re-rank scores among those that may be candidates to `rerank_atol` (`atol` unless given)."""
    rerank_atol = atol if rerank_atol is None else rerank_atol
    orders = set()
    for itc_keys in tie_resolutions(itc, atol):
        if rerank is None or candidates == 0:
            orders.add(tuple(protocol_order(itc_keys, None, 0)))
            continue
        head = protocol_order(itc_keys, None, 0)[:candidates]
        for head_keys in tie_resolutions([rerank[j] for j in head], rerank_atol):
            keys = np.full(len(itc), -np.inf)
            keys[head] = head_keys
            orders.add(tuple(protocol_order(itc_keys, keys, candidates)))
    return orders


def possible_ranks(itc: Sequence[float], rerank: Sequence[float] | None, candidates: int, targets: Sequence[int], atol: float) -> set[int]:
    """The ranks (0 first) the best of `targets` may get among the `possible_orders`."""
    return {min(order.index(target) for target in targets) for order in possible_orders(itc, rerank, candidates, atol)}


def recall_bounds(ranks: Sequence[set[int]], at: Sequence[int] = (1, 5, 10)) -> dict[str, tuple[float, float]]:
    """R@n (percent of queries whose target ranks below n) at its lowest and highest, from each
    query's possible ranks: equal bounds where no near-tie can move a target across n."""
    return {
        f"R@{n}": (100.0 * np.mean([max(r) < n for r in ranks]), 100.0 * np.mean([min(r) < n for r in ranks]))
        for n in at
    }


def assert_recall_within(figures: Mapping[str, float], bounds: Mapping[str, tuple[float, float]], what: str = "") -> None:
    assert set(figures) == set(bounds), f"{what}: {sorted(figures)} != {sorted(bounds)}"
    for name, (low, high) in bounds.items():
        assert low - 1e-9 <= figures[name] <= high + 1e-9, f"{what} {name}: {figures[name]} outside [{low}, {high}]"
