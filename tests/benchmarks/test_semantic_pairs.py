"""The shipped labelled pairs are valid, large enough, complete and split without leaks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.semantic.pairs import (
    CATEGORIES,
    DEV,
    DOMAINS,
    HOLDOUT,
    LABELS,
    TRAP_CATEGORIES,
    Pair,
    is_holdout,
    load_pairs,
)


@pytest.fixture(scope="module")
def dev() -> list[Pair]:
    return load_pairs(DEV)


@pytest.fixture(scope="module")
def holdout() -> list[Pair]:
    return load_pairs(HOLDOUT)


def test_there_are_at_least_400_pairs_and_a_third_is_held_out(
    dev: list[Pair], holdout: list[Pair]
) -> None:
    total = len(dev) + len(holdout)
    assert total >= 450
    assert 0.25 <= len(holdout) / total <= 0.42


@pytest.mark.parametrize("split", ["dev", "holdout"])
def test_every_label_category_and_domain_is_present(
    split: str, dev: list[Pair], holdout: list[Pair]
) -> None:
    pairs = dev if split == "dev" else holdout
    assert set(Counter(p.label for p in pairs)) == set(LABELS)
    categories = Counter(p.category for p in pairs)
    assert set(categories) == set(CATEGORIES)
    # enough traps of each kind that a per-category rate means something
    assert all(categories[c] >= 15 for c in TRAP_CATEGORIES), categories
    assert {p.domain for p in pairs} == set(DOMAINS)
    hits = sum(p.should_hit for p in pairs)
    assert 0.35 <= hits / len(pairs) <= 0.65


def test_no_duplicates_and_no_pair_in_both_splits(dev: list[Pair], holdout: list[Pair]) -> None:
    texts = [(p.query, p.cached_question) for p in dev + holdout]
    assert len(texts) == len(set(texts))
    unordered = [frozenset(t) for t in texts]
    assert len(unordered) == len(set(unordered)), "a pair also appears with its sides swapped"
    assert all(p.query != p.cached_question for p in dev + holdout)


def test_the_split_follows_the_documented_hash_rule(dev: list[Pair], holdout: list[Pair]) -> None:
    assert not any(is_holdout(p.query, p.cached_question) for p in dev)
    assert all(is_holdout(p.query, p.cached_question) for p in holdout)


def test_every_line_has_exactly_the_documented_fields() -> None:
    for path in (DEV, HOLDOUT):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert sorted(record) == sorted(
                ["query", "cached_question", "label", "category", "domain"]
            )


def test_the_loader_rejects_a_mislabelled_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    record = {
        "query": "a",
        "cached_question": "b",
        "label": "hit",
        "category": "negation",
        "domain": "math",
    }
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="bad label/category"):
        load_pairs(bad)
    record.update(label="trap", domain="astrology")
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="unknown domain"):
        load_pairs(bad)
