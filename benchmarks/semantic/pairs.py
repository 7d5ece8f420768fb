"""The labelled pairs: loading, validation and the deterministic dev/holdout split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CATEGORIES",
    "DEV",
    "DOMAINS",
    "HIT_CATEGORIES",
    "HOLDOUT",
    "LABELS",
    "TRAP_CATEGORIES",
    "Pair",
    "is_holdout",
    "load_pairs",
]

HERE = Path(__file__).resolve().parent
DEV = HERE / "pairs_dev.jsonl"
HOLDOUT = HERE / "pairs_holdout.jsonl"

LABELS = ("hit", "trap")
HIT_CATEGORIES = ("near_repeat", "paraphrase")
TRAP_CATEGORIES = ("negation", "entity_swap", "number_date", "scope")
CATEGORIES = HIT_CATEGORIES + TRAP_CATEGORIES
DOMAINS = (
    "coding",
    "travel",
    "cooking",
    "finance",
    "health",
    "customer_support",
    "math",
    "history_geography",
    "product_faq",
)
FIELDS = ("query", "cached_question", "label", "category", "domain")


@dataclass(frozen=True)
class Pair:
    """One labelled pair: is the answer cached for ``cached_question`` right for ``query``?"""

    query: str
    cached_question: str
    label: str
    category: str
    domain: str

    @property
    def should_hit(self) -> bool:
        return self.label == "hit"


def is_holdout(query: str, cached_question: str) -> bool:
    """The split rule: a third of the pairs, chosen by SHA-256 of the pair's text."""
    digest = hashlib.sha256(f"{query}\n{cached_question}".encode()).hexdigest()
    return int(digest, 16) % 3 == 0


def load_pairs(path: Path) -> list[Pair]:
    """Read and validate a JSONL file of pairs; raises ``ValueError`` naming the bad line."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or sorted(record) != sorted(FIELDS):
            raise ValueError(f"{path.name}:{number}: fields must be exactly {FIELDS}")
        if not all(isinstance(record[f], str) and record[f].strip() for f in FIELDS):
            raise ValueError(f"{path.name}:{number}: every field must be a non-empty str")
        pair = Pair(**record)
        expected = "hit" if pair.category in HIT_CATEGORIES else "trap"
        if pair.category not in CATEGORIES or pair.label != expected:
            bad = f"{pair.label}/{pair.category}"
            raise ValueError(f"{path.name}:{number}: bad label/category {bad}")
        if pair.domain not in DOMAINS:
            raise ValueError(f"{path.name}:{number}: unknown domain {pair.domain!r}")
        pairs.append(pair)
    return pairs
