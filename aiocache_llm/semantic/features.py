"""Text to features: what the semantic guard compares, read once per text and cached.

:func:`_features` turns a text into a :class:`_Features`: its numbers (digits,
written, Roman), dates and times, negation, names, units, direction words,
question words and word sequence, using precompiled regular expressions and the
word lists of :mod:`aiocache_llm.semantic.vocabulary`. Results are kept in an LRU
cache of :data:`FEATURE_CACHE_SIZE` texts, so a query checked against several
candidates is analysed once. :mod:`aiocache_llm.semantic.guard` holds the rules
that compare two texts' features.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from aiocache_llm.semantic.vocabulary import (
    _ALIASES,
    _AMBIGUOUS_MONTHS,
    _DAY_WORDS,
    _DIRECTION_INDEX,
    _MONTHS,
    _NEGATIONS,
    _ORDER_MARKERS,
    _QUESTION_PHRASES,
    _QUESTION_WORDS,
    _ROMAN,
    _SCALES,
    _SMALL,
    _STOPWORDS,
    _TENS,
    _UNITS,
    _UNITS_AFTER_NUMBER,
)

__all__ = ["FEATURE_CACHE_SIZE"]

FEATURE_CACHE_SIZE = 4096
"""Texts whose features are kept (per process, shared by every guard)."""

# --- regular expressions --------------------------------------------------------------

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_CONTRACTIONS = [
    (re.compile(r"\b(can)'?t\b", re.I), r"\1 not"),
    (re.compile(r"\bwon't\b", re.I), "will not"),
    (re.compile(r"\bshan't\b", re.I), "shall not"),
    (re.compile(r"\b(ain)'t\b", re.I), "is not"),
    (re.compile(r"\b(\w+)n't\b", re.I), r"\1 not"),
    (re.compile(r"'ve\b", re.I), " have"),
    (re.compile(r"'re\b", re.I), " are"),
    (re.compile(r"'ll\b", re.I), " will"),
    (re.compile(r"\b(i)'m\b", re.I), r"\1 am"),
    (re.compile(r"\b(what|who|where|when|how|that|it|there|here)'s\b", re.I), r"\1 is"),
    (re.compile(r"'s\b", re.I), ""),
    # (the last one) the same without an apostrophe, for the common auxiliaries only
    (
        re.compile(
            r"\b(do|does|did|is|are|was|were|has|have|had|could|should|would|must|wo|ca)nt\b",
            re.I,
        ),
        r"\1 not",
    ),
]
_OPENERS = frozenset(".!?:;\"'([-")
_WORD = re.compile(r"[^\W_](?:[\w+#]|[.'-](?=[^\W_]))*", re.UNICODE)
# a number on its own: not inside a name ("mp3", "PS5", "COVID-19"); "50k" is 50000
_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])(?<![A-Za-z]-)(\d+(?:,\d{3})+|\d+(?:\.\d+)?)(?!\.\d)(k\b)?", re.I
)
_NUMBER_UNIT = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?\s*(°\s*[cf]\b|[a-z°$€£¥₹]+)", re.I)
_UNIT_BEFORE_NUMBER = re.compile(r"([$€£¥₹])\s*\d")
_TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*([ap])\.?m\b\.?|\b(\d{1,2}):(\d{2})\b", re.I)
_RELATIVE = re.compile(
    r"\b(last|next|this|past|previous|coming|current)\s+(day|week|month|year|quarter|decade|"
    r"century|weekend|night|morning|summer|winter|spring|autumn)\b",
    re.I,
)
_EVERY = re.compile(r"\b(?:per|a|an|each|every)\s+(hour|day|night|week|month|quarter|year)\b")
_ROMAN_NUMERAL = re.compile(r"\b(?=[IVXLC]{2,}\b)C{0,3}(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})\b")
_CODE = re.compile(
    r"`([^`]+)`|\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?|\b(\w+_\w+)\b|\b(\w+)\(\)"
)
_BARE_NOT = len(_CONTRACTIONS) - 1
_SYMBOL_NAMES = re.compile(r"(?<![\w])(\.net|c#|c\+\+|f#|==+|!=+)", re.I)
_UNIT_TOKEN = re.compile(r"\d+(?:[.,]\d+)?(?:°?[CcFfKk]|[a-zA-Z]{1,3})")
_AFTER_QUANTITY = re.compile(r"(?:\d|\bdeg(?:ree)?s?)\s*°?\s*$", re.I)


def _casefold(text: str) -> str:
    """Lower-case, accents off (Latin letters only), so ``Zürich`` matches ``zurich``."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def _stem(word: str) -> str:
    """A light English stem: enough for plurals, -ly, -ing and -ed to meet their root."""
    if len(word) <= 3 or not word.isascii():
        return word
    for suffix, keep in (("ies", "y"), ("ing", ""), ("ed", ""), ("ly", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            return word[: -len(suffix)] + keep
    return word


@dataclass(frozen=True, slots=True)
class _Features:
    latin: bool
    numbers: frozenset[str]
    number_order: tuple[str, ...]  # the digits' numbers in the order they appear
    soft_numbers: frozenset[str]  # numbers read from a word that is often no number ("one")
    variants: frozenset[str]  # other readings of its numbers: "401k" may be 401 or 401000
    dates: frozenset[str]
    negated: bool
    entities: frozenset[str]
    words: frozenset[str]  # every folded word, and aliases
    compact: str  # folded letters and digits only, for compounds
    units: frozenset[tuple[str, str]]
    directions: frozenset[tuple[int, bool]]
    sequence: tuple[str, ...]  # stems in order, order markers included
    tokens: tuple[str, ...]  # every stem in order, for aligning the two texts
    initials: frozenset[str]  # initials of 2..5 consecutive words, for acronyms
    questions: frozenset[str]


# the dates of a frequency ("daily", "per day", "every year") start with this
_EVERY_PREFIX = "day:every:"


def _expand(text: str) -> str:
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    text = text.translate(_APOSTROPHES)
    if "'" in text:
        for pattern, replacement in _CONTRACTIONS:
            text = pattern.sub(replacement, text)
    elif "nt" in text.lower():
        for pattern, replacement in (_CONTRACTIONS[0], _CONTRACTIONS[_BARE_NOT]):
            text = pattern.sub(replacement, text)
    return text


def _at_start(text: str, start: int) -> bool:
    """Whether the word at ``start`` opens a sentence (or a quote, a list item, a line)."""
    i = start - 1
    while i >= 0 and text[i].isspace():
        if text[i] == "\n":
            return True
        i -= 1
    # a sentence's end needs a space after it ("3.5", "os.path" do not end one)
    return i < 0 or (text[i] in _OPENERS and (i + 1 < start or text[i] not in ".!?:;"))


def _is_latin(text: str) -> bool:
    if text.isascii():
        return True
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return True
    latin = sum(1 for c in letters if "LATIN" in unicodedata.name(c, ""))
    return latin * 2 >= len(letters)


def _written_numbers(words: list[str]) -> tuple[set[str], set[str]]:
    """Numbers written as words, and those read from "one" (soft)."""
    found: set[str] = set()
    soft: set[str] = set()
    i = 0
    while i < len(words):
        word = words[i]
        value: int | None = None
        if word in _TENS:
            value = _TENS[word]
            if i + 1 < len(words) and words[i + 1] in _SMALL and _SMALL[words[i + 1]] < 10:
                value += _SMALL[words[i + 1]]
                i += 1
        elif word in _SMALL:
            value = _SMALL[word]
        elif word == "second" and i + 1 < len(words) and i > 0:
            # "the second world war", not "30 second timeout" or "wait a second"
            previous = words[i - 1]
            if not previous.isdigit() and previous not in _SMALL and previous not in ("a", "per"):
                value = 2
        if value is not None and i + 1 < len(words) and words[i + 1] in _SCALES:
            value *= _SCALES[words[i + 1]]
            i += 1
        if value is not None:
            (soft if word == "one" and value == 1 else found).add(_number(str(value)))
        elif word in _SCALES and (i == 0 or words[i - 1] in ("a", "per")):
            found.add(_number(str(_SCALES[word])))
        i += 1
    return found, soft


def _number(raw: str, *, thousands: bool = False) -> str:
    """A canonical form of a number: ``1,000`` -> ``1000``, ``2.50`` -> ``2.5``, 50k -> 50000."""
    raw = raw.replace(",", "")
    if thousands:
        raw = repr(float(raw) * 1000)
    if "." in raw:
        raw = raw.rstrip("0").rstrip(".")
    return raw.lstrip("0") or "0"


def _roman(numeral: str) -> int:
    total = 0
    for i, char in enumerate(numeral):
        value = _ROMAN[char]
        if i + 1 < len(numeral) and _ROMAN[numeral[i + 1]] > value:
            total -= value
        else:
            total += value
    return total


@lru_cache(maxsize=FEATURE_CACHE_SIZE)
def _features(text: str) -> _Features:
    expanded = _expand(text)
    folded = _casefold(expanded)
    latin = _is_latin(expanded)
    # the numbers of a time of day are the dates rule's ("3pm" is "15:00")
    times = [m.span() for m in _TIME.finditer(folded)]
    number_order = tuple(
        _number(m.group(1), thousands=bool(m.group(2)))
        for m in _NUMBER.finditer(folded)
        if not any(start <= m.start() < end for start, end in times)
    )
    numbers = set(number_order)
    variants = {
        _number(m.group(1)) for m in _NUMBER.finditer(folded) if m.group(2)
    }  # "50k" read as 50 too (a "401k")
    # words with their positions in the original text, for sentence starts
    raw_words = [(m.group(0), m.start()) for m in _WORD.finditer(expanded)]
    if expanded.isascii():  # folding keeps every position: slice the folded text
        words = [folded[i : i + len(w)].strip(".'-") for w, i in raw_words]
    else:
        words = [_casefold(w).strip(".'-") for w, _ in raw_words]
    soft: set[str] = set()
    if latin:
        written, soft = _written_numbers(words)
        numbers |= written
        numbers |= {str(_roman(m.group(0))) for m in _ROMAN_NUMERAL.finditer(expanded)}
    dates = _dates(expanded, folded, raw_words, words) if latin else set()
    negations = sum(1 for w in words if w in _NEGATIONS) if latin else 0
    entities = _entities(expanded, raw_words) if latin else set()
    units = _units(folded, words) if latin else set()
    directions: set[tuple[int, bool]] = set()
    if latin:
        for word in words:
            directions.update(_DIRECTION_INDEX.get(word, ()))
    questions = set()
    if latin:
        for (raw, start), word in zip(raw_words, words, strict=True):
            # a question word opens a sentence ("When ...") or ends one (", why?")
            if word in _QUESTION_WORDS and (
                _at_start(expanded, start) or expanded[start + len(raw) :].lstrip().startswith("?")
            ):
                questions.add(_QUESTION_WORDS[word])
        if _QUESTION_PHRASES.search(folded):
            match = _QUESTION_PHRASES.search(folded)
            assert match is not None
            phrase = match.group(0)
            questions.add(
                "when"
                if any(p in phrase for p in ("year", "date", "day", "time", "month", "cent", "dec"))
                else "why"
                if ("come" in phrase or "reason" in phrase)
                else "where"
            )
    aliases = {_ALIASES.get(w, w) for w in words}
    compact = re.sub(r"[\W_]+", "", folded)
    stems = [_stem(_ALIASES.get(w, w)) for w in words]
    sequence = tuple(
        s for s, w in zip(stems, words, strict=True) if w in _ORDER_MARKERS or w not in _STOPWORDS
    )
    letters = "".join(w[0] for w in words if w)
    initials = {
        letters[i : i + size] for size in range(2, 6) for i in range(len(letters) - size + 1)
    }
    return _Features(
        latin=latin,
        numbers=frozenset(numbers - soft),
        number_order=number_order,
        soft_numbers=frozenset(soft - numbers),
        variants=frozenset(variants),
        dates=frozenset(dates),
        negated=negations % 2 == 1,
        entities=frozenset(entities),
        words=frozenset(words) | frozenset(aliases) | frozenset(stems),
        compact=compact,
        units=frozenset(units),
        directions=frozenset(directions),
        sequence=sequence,
        tokens=tuple(stems) if latin else (),
        initials=frozenset(initials),
        questions=frozenset(questions),
    )


def _dates(
    expanded: str, folded: str, raw_words: list[tuple[str, int]], words: list[str]
) -> set[str]:
    found: set[str] = set()
    for (raw, _), word in zip(raw_words, words, strict=True):
        month = _MONTHS.get(word)
        if month is not None and (word not in _AMBIGUOUS_MONTHS or raw[:1].isupper()):
            found.add(f"month:{month}")
        day = _DAY_WORDS.get(word)
        if day is not None and not (word == "spring" and raw[:1].isupper()):
            found.add(f"day:{day}")
    for match in _TIME.finditer(folded):
        if match.group(3):
            hour = int(match.group(1)) % 12 + (12 if match.group(3) == "p" else 0)
            minute = int(match.group(2) or 0)
        else:
            hour, minute = int(match.group(4)), int(match.group(5))
        found.add(f"time:{hour:02d}:{minute:02d}")
    for match in _EVERY.finditer(folded):
        found.add(f"day:every:{match.group(1)}")  # "per day" is "daily"
    for match in _RELATIVE.finditer(folded):
        which = {"past": "last", "previous": "last", "coming": "next", "current": "this"}
        found.add(f"rel:{which.get(match.group(1), match.group(1))}:{match.group(2)}")
    return found


def _entities(expanded: str, raw_words: list[tuple[str, int]]) -> set[str]:
    found: set[str] = set()
    run: list[str] = []  # consecutive capitalized words: one name ("United Kingdom")
    previous_end = -2
    for raw, start in raw_words:
        if run and (start - previous_end > 1 or not raw[:1].isupper()):
            _add_run(found, run)
            run = []
        previous_end = start + len(raw)
        if raw.islower() or not any(c.isupper() for c in raw):
            continue  # every kind of name below has a capital letter
        bare = raw.strip(".'-")
        if not bare or bare in ("I", "I'm", "I'd", "I've", "I'll") or bare.isdigit():
            continue
        folded = _casefold(bare)
        if _ROMAN_NUMERAL.fullmatch(bare) or folded in _STOPWORDS or folded in _UNITS:
            continue  # a number, a unit (their own rules), or "OK", "Hi"
        if _UNIT_TOKEN.fullmatch(bare) or (
            len(bare) == 1 and _AFTER_QUANTITY.search(expanded[max(0, start - 12) : start])
        ):
            continue  # "180C", "2kg", "degrees C": the units rule
        upper = sum(1 for c in bare if c.isupper())
        inner_upper = any(c.isupper() for c in bare[1:])
        acronym = upper >= 2 and (bare.isupper() or inner_upper)
        mixed = bool(inner_upper and any(c.islower() for c in bare))
        digits_and_letters = (
            any(c.isdigit() for c in bare) and any(c.isalpha() for c in bare) and upper > 0
        )
        capitalized = bare[:1].isupper()
        at_start = _at_start(expanded, start)
        if acronym or mixed or digits_and_letters or (capitalized and not at_start):
            found.add(_entity_key(bare))
            if capitalized:
                run.append(bare)
    _add_run(found, run)
    for match in _CODE.finditer(expanded):
        name = next(group for group in match.groups() if group)
        found.add(_entity_key(name))
    for match in _SYMBOL_NAMES.finditer(expanded):
        found.add(match.group(1).lower())
    return found


def _add_run(found: set[str], run: list[str]) -> None:
    """Replace the words of a multi-word name by the name: "united kingdom" (space-joined)."""
    if len(run) > 1:
        parts = [_entity_key(part) for part in run]
        found.difference_update(parts)
        found.add(" ".join(parts))


def _entity_key(name: str) -> str:
    key = re.sub(r"[\W_]+", "", _casefold(name))
    return _ALIASES.get(key, key)


def _units(folded: str, words: list[str]) -> set[tuple[str, str]]:
    found = {_UNITS[w] for w in words if w in _UNITS and len(w) > 1}
    for match in _NUMBER_UNIT.finditer(folded):
        unit = match.group(1).replace(" ", "")
        if unit in _UNITS:
            found.add(_UNITS[unit])
        elif unit in _UNITS_AFTER_NUMBER:
            found.add(_UNITS_AFTER_NUMBER[unit])
        elif unit.startswith("°") and unit[1:] in ("c", "f"):
            found.add(("temperature", unit[1:]))
    for match in _UNIT_BEFORE_NUMBER.finditer(folded):
        found.add(_UNITS[match.group(1)])
    for symbol in "$€£¥₹":
        if symbol in folded:
            found.add(_UNITS[symbol])
    # "degrees C" / "degrees F"
    for match in re.finditer(r"\bdeg(?:ree)?s?\s+([cf])\b", folded):
        found.add(("temperature", match.group(1)))
    found.discard(("thousands", "k"))
    return found
