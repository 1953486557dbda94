"""Splits: seeded and reproducible, stratified, group-aware, ``limit`` on train only, ``index`` 0..n-1."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.split import apply_limit, finalize, split_items, split_or_reuse


def _items(n: int, classes: int = 3, group_size: int = 1) -> list[dict]:
    return [{"label": (i // group_size) % classes, "group": f"g{i // group_size}", "id": i} for i in range(n)]


def _ids(items):
    return [i["id"] for i in items]


def test_same_seed_same_split_and_other_seed_differs():
    items = _items(300)
    a = split_items(items, val_fraction=0.15, test_fraction=0.15, seed=3)
    b = split_items(items, val_fraction=0.15, test_fraction=0.15, seed=3)
    c = split_items(items, val_fraction=0.15, test_fraction=0.15, seed=4)
    assert [_ids(p) for p in a] == [_ids(p) for p in b]
    assert [_ids(p) for p in a] != [_ids(p) for p in c]


def test_stratified_fractions_per_class():
    items = _items(600, classes=3)
    train, val, test = split_items(items, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert Counter(i["label"] for i in val) == {0: 40, 1: 40, 2: 40}
    assert Counter(i["label"] for i in test) == {0: 20, 1: 20, 2: 20}
    assert len(train) == 420


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), group_size=st.integers(1, 5), seed=st.integers(0, 10_000),
       val=st.floats(0, 0.45), test=st.floats(0, 0.45))
def test_groups_never_straddle_splits_and_nothing_is_lost(n, group_size, seed, val, test):
    items = _items(n, group_size=group_size)
    parts = split_items(items, val_fraction=val, test_fraction=test, seed=seed, group_key="group")
    groups = [{i["group"] for i in p} for p in parts]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert sorted(_ids(parts[0] + parts[1] + parts[2])) == list(range(n))


def test_limit_applies_to_train_only_and_index_is_position():
    items = _items(100)
    train, val, test = split_items(items, val_fraction=0.1, test_fraction=0.1, seed=0)
    t, v, s = finalize(train, val, test, limit=7, seed=0)
    assert len(t) == 7 and len(v) == len(val) and len(s) == len(test)
    for part in (t, v, s):
        assert [i["index"] for i in part] == list(range(len(part)))
    assert _ids(apply_limit(train, 7, 0)) == _ids(apply_limit(train, 7, 0))
    assert "index" not in train[0]  # the inputs are not modified


def test_too_few_items_are_reused_with_a_note():
    data = SimpleNamespace(val_fraction=0.15, test_fraction=0.15, split_seed=0)
    notes: list[str] = []
    train, val, test = split_or_reuse(_items(2), data, notes, what="volumes", stratify_key=None)
    assert len(train) == len(val) == len(test) == 2
    assert notes and "reused" in notes[0]


def test_empty_val_after_rounding_gets_one_group():
    data = SimpleNamespace(val_fraction=0.1, test_fraction=0.1, split_seed=0)
    notes: list[str] = []
    train, val, test = split_or_reuse(_items(4, group_size=1), data, notes, what="volumes", stratify_key=None,
                                      group_key="group")
    assert len(val) == 1 and len(test) == 1 and len(train) == 2
