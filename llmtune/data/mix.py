"""Mixing sources by weight and holding out eval rows, both seeded.

A source's ``weight`` multiplies its row count: ``floor(weight)`` full copies of its rows,
plus a random sample (without repeats) of the fraction left over. With 100 rows, 0.5 takes
50 of them, 2.0 repeats all 100 twice (200) and 1.5 gives all 100 plus 50 of them again.

An ``eval`` fraction is held out of the sources' rows *before* weighting, so that a row
repeated by its weight never ends up in both the train and the eval set.
"""

import math


def weigh(rows, weight, rng):
    copies = math.floor(weight)
    return rows * copies + rng.sample(rows, round((weight - copies) * len(rows)))


def weighed(count, weight):
    """How many rows `weigh` gives of `count` rows."""
    copies = math.floor(weight)
    return count * copies + round((weight - copies) * count)


def held(total, fraction):
    """How many of `total` rows `hold_out` takes."""
    return min(total - 1, max(1, round(fraction * total)))


def hold_out(row_lists, fraction, rng):
    """Take `fraction` of all rows (at least one, never all) out of the per-source lists.

    Returns the rows each source keeps and the held-out rows, in random order.
    """
    flat = [(source, row) for source, rows in enumerate(row_lists) for row in rows]
    taken = rng.sample(range(len(flat)), held(len(flat), fraction))
    skipped = set(taken)
    kept = [[] for _ in row_lists]
    for index, (source, row) in enumerate(flat):
        if index not in skipped:
            kept[source].append(row)
    return kept, [flat[index][1] for index in taken]
