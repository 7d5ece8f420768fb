"""``SemanticGuard``: refuse a semantic candidate that differs in what changes the answer.

Cosine similarity rewards shared words, so the traps of a semantic cache look alike:
"flights *to* Paris" / "flights *from* Paris", "last *3* elements" / "last *5*
elements", "visit *with* a visa" / "visit *without* a visa", "connect to
*PostgreSQL*" / "connect to *MySQL*". The guard extracts, from each text, the few
features such words carry, and refuses the pair when they differ. Each rule is one
comparison of those features; :data:`RULES` lists them, and ``SemanticGuard(rules=...)``
picks which run (all by default).

Rules (a pair is refused when a rule finds a difference):

``numbers``
    the sets of numbers differ: digits (``1,000``, ``2.5``, ``3rd``), written numbers
    (``two``, ``twenty five``, ``a dozen``; ``one`` only counts when the other text has
    a 1, since it is often a pronoun) and Roman numerals (``World War II``); the same
    numbers in another order (``$49 instead of $39`` / ``$39 instead of $49``) too.
    ``50k`` is 50000 (or 50: a ``401k``); digits inside a name (``PS5``, ``COVID-19``)
    are the entities rule's.
``dates``
    months, weekdays, seasons, today/tomorrow/tonight/weekend, times of day (``3pm``,
    ``15:30``, ``noon``) and relative periods (``last year``, ``next week``) differ, or
    both texts give a frequency and they differ (``monthly`` / ``annual``; ``per day``
    is ``daily``).
``negation``
    one text is negated and the other not (``not``, ``n't``, ``never``, ``no``,
    ``without``, ``none``, ``nothing``, ...; an even count cancels out), or a word
    stands against its negative form (``safe``/``unsafe``, ``legal``/``illegal``).
``entities``
    a name in one text is absent from the other: capitalized words not at the start
    of a sentence, acronyms, mixed-case and code identifiers (``PostgreSQL``,
    ``os.path``, ``snake_case``, ``C#``). Matched case-insensitively against the other
    text's words, so a lower-cased repeat still passes; a few common aliases
    (``JS``/``JavaScript``, ``US``/``USA``/``United States``), acronyms of the other
    text's words (``IDP``/``international driving permit``) and a place and its people
    (``Japan``/``Japanese``) count as the same.
``units``
    for a dimension both texts mention (length, mass, volume, temperature, currency,
    data size, time), the units differ: ``km``/``miles``, ``°C``/``°F``, ``USD``/``EUR``.
``direction``
    opposite words of one pair appear on the two sides (more/less, before/after,
    increase/decrease, max/min, ascending/descending, import/export, open/closed,
    first/last, ...), or the same two words stand in the opposite order around
    ``to``/``from``/``into``/``than`` (``from Paris to Brussels`` / ``from Brussels to
    Paris``, ``convert JSON to dict`` / ``convert dict to JSON``). ``A vs B`` and
    ``B vs A`` are the same question and pass.
``question``
    both texts ask with a different question word among who/where/when/why
    (``When was it founded`` / ``Where was it founded``; ``what year`` counts as when).
``substitution``
    the texts share most content words but each has one or two words the other lacks
    (``roast a chicken`` / ``roast a turkey``, ``with kids`` / ``for couples``): a
    swapped subject. Words within a small edit distance (typos, British/American
    spelling), prefixes (``info``/``information``) and compounds (``power bank``/
    ``powerbank``) count as the same word.

Paraphrases that keep the facts pass: casing, punctuation, contractions, word order,
politeness ("please", "thanks"), typos, and synonyms of words that are not rule
features. English first: the word rules apply only to texts written mostly in Latin
letters; in other scripts only digits are compared (rules that cannot apply pass).

Cost: a few microseconds per pair. Features are computed with precompiled regular
expressions once per text and cached (:data:`FEATURE_CACHE_SIZE` texts, LRU), so a
query checked against several candidates is analysed once. Thread-safe and
stateless; a sync callable, so a cache calls it inline.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.semantic.features import (
    _EVERY_PREFIX,
    FEATURE_CACHE_SIZE,
    _Features,
    _features,
    _number,
    _stem,
)
from aiocache_llm.semantic.vocabulary import (
    _ALIAS_NAMES,
    _ALIASES,
    _DAY_WORDS,
    _DEMONYM_ENDINGS,
    _DIRECTION_INDEX,
    _MONTHS,
    _NEGATIONS,
    _NEGATIVE_PREFIXES,
    _ORDER_MARKERS,
    _SCALES,
    _SMALL,
    _STOPWORDS,
    _TENS,
    _UNITS,
)

__all__ = ["FEATURE_CACHE_SIZE", "RULES", "SemanticGuard"]

RULES: tuple[str, ...] = (
    "numbers",
    "dates",
    "negation",
    "entities",
    "units",
    "direction",
    "question",
    "substitution",
)
"""Every rule of :class:`SemanticGuard`, in the order they are checked."""

# direction words by stem, for the substitution rule: "raise" / "increase" is no swap
_DIRECTION_STEMS: dict[str, frozenset[tuple[int, bool]]] = {}
for _word, _classes in _DIRECTION_INDEX.items():
    _DIRECTION_STEMS[_stem(_word)] = _DIRECTION_STEMS.get(_stem(_word), frozenset()) | frozenset(
        _classes
    )

# words other rules judge: a swap of them is theirs to refuse or accept (not direction
# words: that rule needs both words of a pair, "covered" / "excluded" is a swap)
_HANDLED_WORDS = (
    _NEGATIONS
    | set(_UNITS)
    | set(_DAY_WORDS)
    | set(_MONTHS)
    | set(_SMALL)
    | set(_TENS)
    | set(_SCALES)
)
_HANDLED = frozenset(_HANDLED_WORDS | {_stem(w) for w in _HANDLED_WORDS})


class SemanticGuard:
    """A ``verify=`` that refuses candidates differing in what changes the answer.

    ``SemanticGuard()`` runs every rule of :data:`RULES`; ``rules=`` picks some
    (an iterable of rule names; unknown names raise :class:`InvalidInputError`).
    ``max_substitution`` (1..5, default 2) is how many words each side may have
    that the other lacks for the ``substitution`` rule to call it a swap (more is a
    rewording, not a swap).

    Call it as ``guard(query_text, candidate_text, similarity) -> bool`` (True:
    serve it); ``guard.explain(query_text, candidate_text)`` names the first rule
    that refuses, or ``None``. Symmetric: swapping the texts gives the same verdict.
    The similarity is not used (the guard judges words, the cache judges vectors).
    Never raises for any pair of strings.
    """

    __slots__ = ("_checks", "_max_substitution", "rules")

    def __init__(self, *, rules: Iterable[str] | None = None, max_substitution: int = 2) -> None:
        chosen: tuple[str, ...] = RULES
        if rules is not None:
            if isinstance(rules, str):
                raise InvalidInputTypeError("rules must be an iterable of rule names, not a str")
            chosen = tuple(rules)
            for rule in chosen:
                if rule not in RULES:
                    raise InvalidInputError(
                        f"unknown SemanticGuard rule {rule!r}; rules are {', '.join(RULES)}"
                    )
        if type(max_substitution) is not int:
            raise InvalidInputTypeError(
                f"max_substitution must be an int, got {type(max_substitution).__name__}"
            )
        if not 1 <= max_substitution <= 5:
            raise InvalidInputError(f"max_substitution must be in 1..5, got {max_substitution}")
        self.rules: tuple[str, ...] = tuple(r for r in RULES if r in chosen)
        self._max_substitution = max_substitution
        self._checks = tuple(getattr(self, f"_{rule}") for rule in self.rules)

    def __repr__(self) -> str:
        if self.rules == RULES:
            return "SemanticGuard()"
        return f"SemanticGuard(rules={list(self.rules)!r})"

    def __call__(self, query_text: str, candidate_text: str, similarity: float = 1.0) -> bool:
        """True when the candidate may be served for the query (no rule refuses)."""
        return self.explain(query_text, candidate_text) is None

    def explain(self, query_text: str, candidate_text: str) -> str | None:
        """The name of the first rule that refuses the pair, or ``None`` if all pass."""
        if not isinstance(query_text, str) or not isinstance(candidate_text, str):
            raise InvalidInputTypeError("SemanticGuard compares two str")
        if query_text == candidate_text:
            return None
        a, b = _features(query_text), _features(candidate_text)
        for rule, check in zip(self.rules, self._checks, strict=True):
            if check(a, b):
                return rule
        return None

    # each rule: True when the two texts differ in what it looks at

    @staticmethod
    def _numbers(a: _Features, b: _Features) -> bool:
        only_a = a.numbers - b.numbers - b.soft_numbers - b.variants
        only_b = b.numbers - a.numbers - a.soft_numbers - a.variants
        # a number read two ways ("50k") matches either reading on the other side
        if any(not _read_as(x, a, b) for x in only_a) or any(not _read_as(x, b, a) for x in only_b):
            return True
        # the same numbers in another order: "$49 instead of $39" / "$39 instead of $49"
        return (
            len(set(a.number_order)) >= 2
            and sorted(a.number_order) == sorted(b.number_order)
            and a.number_order != b.number_order
        )

    @staticmethod
    def _dates(a: _Features, b: _Features) -> bool:
        # a frequency ("daily", "per year") said on one side only is left unsaid on the other
        every_a = {d for d in a.dates if d.startswith(_EVERY_PREFIX)}
        every_b = {d for d in b.dates if d.startswith(_EVERY_PREFIX)}
        if a.dates - every_a != b.dates - every_b:
            return True
        return bool(every_a and every_b and every_a != every_b)

    @staticmethod
    def _negation(a: _Features, b: _Features) -> bool:
        if not (a.latin and b.latin):
            return False
        if a.negated != b.negated:
            return True
        # safe / unsafe: a word in one text, its negative form in the other
        for x, y in ((a, b), (b, a)):
            for word in x.words - y.words:
                for prefix in _NEGATIVE_PREFIXES:
                    if word.startswith(prefix) and word[len(prefix) :] in y.words:
                        return len(word) - len(prefix) >= 4
        return False

    @staticmethod
    def _entities(a: _Features, b: _Features) -> bool:
        return _missing(a.entities, b) or _missing(b.entities, a)

    @staticmethod
    def _units(a: _Features, b: _Features) -> bool:
        dims_a = {dim for dim, _ in a.units}
        dims_b = {dim for dim, _ in b.units}
        for dim in dims_a & dims_b:
            if {u for d, u in a.units if d == dim} != {u for d, u in b.units if d == dim}:
                return True
        return False

    @staticmethod
    def _direction(a: _Features, b: _Features) -> bool:
        for group, positive in a.directions:
            if (group, not positive) in b.directions and (group, positive) not in b.directions:
                return True
        for group, positive in b.directions:
            if (group, not positive) in a.directions and (group, positive) not in a.directions:
                return True
        return _swapped(a.sequence, b.sequence)

    @staticmethod
    def _question(a: _Features, b: _Features) -> bool:
        return bool(a.questions and b.questions and not (a.questions & b.questions))

    def _substitution(self, a: _Features, b: _Features) -> bool:
        return _swap(a.tokens, b.tokens, self._max_substitution)


def _missing(entities: frozenset[str], other: _Features) -> bool:
    """Whether some entity is nowhere in the other text (words, aliases, compounds, initials)."""
    for entity in entities:
        if " " in entity:  # a multi-word name: whole, or each of its words
            joined = entity.replace(" ", "")
            if _present(joined, other) or all(_present(p, other) for p in entity.split()):
                continue
            return True
        if not _present(entity, other):
            return True
    return False


def _present(entity: str, other: _Features) -> bool:
    if (
        entity in other.entities
        or entity in other.words
        or _stem(entity) in other.words
        or entity in other.compact
        or entity in other.initials
    ):
        return True
    if any(name in other.compact for name in _ALIAS_NAMES.get(entity, ())):
        return True
    # a place and its people: "Japan" / "Japanese", "Italy" / "Italian"
    root = entity[:-1] if entity.endswith(("y", "a", "e")) else entity
    if len(root) >= 4 and any(root + end in other.words for end in _DEMONYM_ENDINGS):
        return True
    for end in _DEMONYM_ENDINGS:  # and the other way: "Japanese" / "Japan"
        base = entity[: -len(end)]
        if (
            entity.endswith(end)
            and len(base) >= 4
            and any(base + tail in other.words for tail in ("", "y", "a", "e"))
        ):
            return True
    return False


def _swap(first: tuple[str, ...], second: tuple[str, ...], most: int) -> bool:
    """Whether the texts are the same words around one short span swapped for another.

    The common prefix and suffix (words equal up to a typo) must cover at least two
    words and half of the shorter text; the two spans left in the middle must each
    hold 1..``most`` content words, differ in length by at most one word, and not be
    one compound spelled apart ("power bank" / "powerbank").
    """
    n, m = len(first), len(second)
    start = 0
    while start < min(n, m) and _close(first[start], second[start]):
        start += 1
    end = 0
    while end < min(n, m) - start and _close(first[n - 1 - end], second[m - 1 - end]):
        end += 1
    middle_a, middle_b = first[start : n - end], second[start : m - end]
    if start + end < max(2, min(n, m) / 2) or abs(len(middle_a) - len(middle_b)) > 1:
        return False
    # swapped words are absent from the other text altogether (not moved), and not a
    # number, unit, date, negation or direction word (their own rules judge those)
    content_a = [w for w in middle_a if _substitutable(w) and not _among(w, second)]
    content_b = [w for w in middle_b if _substitutable(w) and not _among(w, first)]
    if not (0 < len(content_a) <= most and 0 < len(content_b) <= most):
        return False
    joined_a = "".join(w for w in middle_a if w not in _STOPWORDS)
    joined_b = "".join(w for w in middle_b if w not in _STOPWORDS)
    if _ALIASES.get(joined_a, joined_a) == _ALIASES.get(joined_b, joined_b):
        return False  # "UK" / "United Kingdom"
    return not _close(joined_a, joined_b)


def _substitutable(word: str) -> bool:
    return not (word in _STOPWORDS or word in _HANDLED or any(c.isdigit() for c in word))


def _among(word: str, tokens: tuple[str, ...]) -> bool:
    """Whether ``word`` is in ``tokens`` (up to a typo), or a word of the same direction is."""
    if any(_close(word, token) for token in tokens):
        return True
    classes = _DIRECTION_STEMS.get(word)
    return classes is not None and any(
        not classes.isdisjoint(_DIRECTION_STEMS.get(token, ())) for token in tokens
    )


def _close(a: str, b: str) -> bool:
    """Whether two words are one word spelled differently (typo, variant, prefix, plural)."""
    if a == b:
        return True
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    if len(short) >= 4 and long.startswith(short):
        return True  # info / information, config / configuration
    if len(short) < 4 or len(long) - len(short) > 2:
        return False
    return _edit_distance(short, long, 2 if len(short) >= 6 else 1) is not None


def _edit_distance(a: str, b: str, bound: int) -> int | None:
    """Levenshtein distance if it is ``<= bound`` (one row at a time), else ``None``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        if min(current) > bound:
            return None
        previous = current
    return previous[-1] if previous[-1] <= bound else None


def _swapped(first: tuple[str, ...], second: tuple[str, ...]) -> bool:
    """Whether two words stand in the opposite order around a direction marker in both."""
    pairs_first = _ordered_pairs(first)
    if not pairs_first:
        return False
    return any((y, x) in pairs_first for x, y in _ordered_pairs(second))


def _ordered_pairs(sequence: tuple[str, ...]) -> set[tuple[str, str]]:
    """(x, y) for the content words x before a marker and y after it (nearest 2 each side)."""
    pairs: set[tuple[str, str]] = set()
    for i, word in enumerate(sequence):
        if word not in _ORDER_MARKERS:
            continue
        before = [w for w in sequence[max(0, i - 3) : i] if w not in _ORDER_MARKERS][-2:]
        after = [w for w in sequence[i + 1 : i + 4] if w not in _ORDER_MARKERS][:2]
        if word == "from":  # "from X to Y": X is after "from", Y after the next "to"
            rest = sequence[i + 1 :]
            if "to" in rest or "into" in rest:
                cut = next(j for j, w in enumerate(rest) if w in ("to", "into"))
                before = [w for w in rest[:cut] if w not in _ORDER_MARKERS][:2]
                after = [w for w in rest[cut + 1 : cut + 4] if w not in _ORDER_MARKERS][:2]
            else:
                continue
        for x in before:
            for y in after:
                if x != y:
                    pairs.add((x, y))
    return pairs


def _read_as(number: str, mine: _Features, other: _Features) -> bool:
    """Whether ``number`` came from "<n>k" in its own text and ``n`` is in the other's."""
    kilo = _kilo(number)
    return kilo is not None and kilo in mine.variants and kilo in other.numbers


def _kilo(number: str) -> str | None:
    """``number`` / 1000 as :func:`_number` writes it, if it is a multiple of 1000."""
    try:
        value = float(number)
    except ValueError:
        return None
    return _number(repr(value / 1000)) if value and value % 1000 == 0 else None
