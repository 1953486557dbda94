"""Reproducible train/val/test splits: seeded, stratified by class, group-aware, then ``limit`` and ``index``.

Groups (e.g. HAM10000 ``lesion_id``) never straddle two splits: whole groups are assigned, stratified by
the class of their first item. Within each class, groups are shuffled with a seeded generator and the first
``round(n * test_fraction)`` go to test, the next ``round(n * val_fraction)`` to val, the rest to train.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from pipeline.names import Keys as Ours

Item = dict[str, Any]
Splits = tuple[list[Item], list[Item], list[Item]]


def _groups(items: list[Item], group_key: str | None) -> dict[Hashable, list[Item]]:
    groups: dict[Hashable, list[Item]] = {}
    for pos, item in enumerate(items):
        key = item[group_key] if group_key else pos
        groups.setdefault(key, []).append(item)
    return groups


def _stratum(group: list[Item], stratify_key: str | None) -> Hashable:
    if stratify_key is None:
        return 0
    value = group[0].get(stratify_key, 0)
    return value if isinstance(value, Hashable) else 0


def split_items(items: list[Item], *, val_fraction: float, test_fraction: float, seed: int,
                stratify_key: str | None = "label", group_key: str | None = None) -> Splits:
    """Seeded, stratified, group-aware split; the same inputs always give the same three lists (input order kept)."""
    rng = np.random.default_rng(seed)
    strata: dict[Hashable, list[list[Item]]] = defaultdict(list)
    for group in _groups(items, group_key).values():
        strata[_stratum(group, stratify_key)].append(group)
    where: dict[int, int] = {}  # id(item) -> 0 train, 1 val, 2 test
    for key in sorted(strata, key=repr):
        groups = strata[key]
        order = rng.permutation(len(groups))
        n_test = int(round(len(groups) * test_fraction))
        n_val = int(round(len(groups) * val_fraction))
        for rank, g in enumerate(order):
            target = 2 if rank < n_test else 1 if rank < n_test + n_val else 0
            for item in groups[g]:
                where[id(item)] = target
    out: Splits = ([], [], [])
    for item in items:
        out[where[id(item)]].append(item)
    return out


def apply_limit(train: list[Item], limit: int | None, seed: int) -> list[Item]:
    """A seeded random subset of ``limit`` training items, in their original order."""
    if limit is None or limit >= len(train):
        return train
    keep = np.sort(np.random.default_rng(seed).permutation(len(train))[:limit])
    return [train[i] for i in keep]


def with_index(items: list[Item]) -> list[Item]:
    """Copies of the dicts with ``index`` = position in the list (0..len-1)."""
    return [{**item, Ours.INDEX.value: pos} for pos, item in enumerate(items)]


def finalize(train: list[Item], val: list[Item], test: list[Item], *, limit: int | None, seed: int) -> Splits:
    """Apply ``data.limit`` to the training split only, then number every split 0..len-1."""
    return with_index(apply_limit(train, limit, seed)), with_index(val), with_index(test)


def split_or_reuse(items: list[Item], cfg_data, notes: list[str], *, what: str = "samples",
                   stratify_key: str | None = "label", group_key: str | None = None,
                   min_per_split: Callable[[int], bool] = lambda n: n >= 3) -> Splits:
    """Split when there are enough items; otherwise use all of them for training and reuse them for val/test.

    With enough items, val and test get at least one group each when their fraction is positive.
    """
    if not min_per_split(len(items)):
        notes.append(f"too few {what} to hold any out ({len(items)}): all are used for training and reused "
                     "for validation and test (no held-out data)")
        return list(items), list(items), list(items)
    train, val, test = split_items(items, val_fraction=cfg_data.val_fraction, test_fraction=cfg_data.test_fraction,
                                   seed=cfg_data.split_seed, stratify_key=stratify_key, group_key=group_key)
    for name, part, frac in (("val", val, cfg_data.val_fraction), ("test", test, cfg_data.test_fraction)):
        if not part and frac > 0 and len(train) > 1:
            _move_last_group(train, part, group_key)
            notes.append(f"the {name} split was empty after rounding; moved one group of {what} into it")
    return train, val, test


def _move_last_group(src: list[Item], dst: list[Item], group_key: str | None) -> None:
    """Move the last item of ``src`` (with every item of its group) into ``dst``."""
    last = src[-1]
    moving = [it for it in src if group_key and it[group_key] == last[group_key]] if group_key else [last]
    if len(moving) == len(src):
        return
    ids = {id(it) for it in moving}
    src[:] = [it for it in src if id(it) not in ids]
    dst.extend(moving)
