"""The word lists the semantic guard reads: numbers, dates, negations, units, names.

Plain data, English first: written numbers and Roman numerals, months and other
date words, negations, the opposite-word pairs of the direction rule, units by
dimension, question words, name aliases and stopwords. Tables derived from the
lists (by word, by alias target) are built once at import.
:mod:`aiocache_llm.semantic.features` reads them to turn a text into features;
:mod:`aiocache_llm.semantic.guard` compares those features.
"""

from __future__ import annotations

import re

_SMALL = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "dozen": 12, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10,
}  # fmt: skip
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}

_MONTHS = {
    "january": "jan", "february": "feb", "march": "mar", "april": "apr", "may": "may",
    "june": "jun", "july": "jul", "august": "aug", "september": "sep", "october": "oct",
    "november": "nov", "december": "dec", "jan": "jan", "feb": "feb", "aug": "aug",
    "sept": "sep", "oct": "oct", "nov": "nov", "dec": "dec",
}  # fmt: skip
# months that are also common words count only when capitalized
_AMBIGUOUS_MONTHS = frozenset({"march", "may", "jan", "dec", "oct", "nov", "aug"})
_DAY_WORDS = {
    "monday": "mon", "tuesday": "tue", "wednesday": "wed", "thursday": "thu",
    "friday": "fri", "saturday": "sat", "sunday": "sun", "mondays": "mon",
    "tuesdays": "tue", "wednesdays": "wed", "thursdays": "thu", "fridays": "fri",
    "saturdays": "sat", "sundays": "sun", "weekend": "weekend", "weekends": "weekend",
    "weekday": "weekday", "weekdays": "weekday", "today": "today", "tonight": "tonight",
    "tomorrow": "tomorrow", "yesterday": "yesterday", "summer": "summer",
    "winter": "winter", "autumn": "autumn", "spring": "spring", "noon": "noon",
    "midnight": "midnight", "morning": "morning", "afternoon": "afternoon",
    "evening": "evening", "overnight": "night", "night": "night", "hourly": "every:hour",
    "daily": "every:day", "nightly": "every:night", "weekly": "every:week",
    "biweekly": "every:2weeks", "monthly": "every:month", "quarterly": "every:quarter",
    "yearly": "every:year", "annual": "every:year", "annually": "every:year",
}  # fmt: skip

_NEGATIONS = frozenset(
    {"not", "no", "never", "without", "none", "nothing", "nobody", "neither", "nor",
     "nowhere", "cannot"}
)  # fmt: skip
_NEGATIVE_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")

# direction: each group is (positive words, negative words)
_DIRECTIONS: tuple[tuple[frozenset[str], frozenset[str]], ...] = tuple(
    (frozenset(plus.split()), frozenset(minus.split()))
    for plus, minus in (
        ("more", "less fewer"),
        ("most", "least fewest"),
        ("before prior", "after"),
        ("increase increasing increased raise", "decrease decreasing decreased"),
        ("max maximum highest largest biggest", "min minimum lowest smallest"),
        ("higher larger bigger greater", "lower smaller"),
        ("above", "below"),
        ("ascending asc", "descending desc"),
        ("first", "last"),
        ("earliest oldest", "latest newest"),
        ("open opened opening", "closed closing"),
        ("buy buying purchase", "sell selling"),
        ("import importing", "export exporting"),
        ("upload uploading", "download downloading"),
        ("add adding", "remove removing delete deleting"),
        ("enable enabling enabled", "disable disabling disabled"),
        ("encode encoding", "decode decoding"),
        ("encrypt encrypting", "decrypt decrypting"),
        ("compress compressing", "decompress decompressing"),
        ("lock locking", "unlock unlocking"),
        ("install installing", "uninstall uninstalling"),
        ("include including", "exclude excluding"),
        ("allowed permitted", "banned prohibited forbidden"),
        ("arrival arrivals arriving", "departure departures departing"),
        ("gain gaining", "lose losing loss"),
        ("profit", "loss"),
        ("advantages pros", "disadvantages cons"),
        ("best", "worst"),
        ("cheapest cheaper cheap", "expensive priciest"),
        ("fastest faster", "slowest slower"),
        ("north northern", "south southern"),
        ("east eastern", "west western"),
        ("inbound incoming", "outbound outgoing"),
        ("input", "output"),
        ("hot warm", "cold"),
        ("beginner beginners novice", "advanced expert experienced"),
        ("economy", "business"),
        ("budget", "luxury"),
        ("eat", "avoid"),
        ("ascending", "descending"),
        ("upgrade upgrading", "downgrade downgrading"),
        ("good", "bad"),
        ("rainy rain wet", "sunny sun dry"),
        ("thicken thicker", "thin thinner"),
    )
)
_DIRECTION_INDEX: dict[str, list[tuple[int, bool]]] = {}
for _group, (_plus, _minus) in enumerate(_DIRECTIONS):
    for _word in _plus:
        _DIRECTION_INDEX.setdefault(_word, []).append((_group, True))
    for _word in _minus:
        _DIRECTION_INDEX.setdefault(_word, []).append((_group, False))
_ORDER_MARKERS = frozenset({"to", "from", "into", "than"})

# unit word -> (dimension, canonical unit); bare one-letter units count only after a number
_UNITS: dict[str, tuple[str, str]] = {}
for _dimension, _groups in {
    "length": {
        "km": "km kms kilometer kilometers kilometre kilometres",
        "mi": "mi mile miles",
        "m": "meter meters metre metres",
        "cm": "cm centimeter centimeters centimetre centimetres",
        "mm": "mm millimeter millimeters millimetre millimetres",
        "ft": "ft foot feet",
        "in": "inch inches",
        "yd": "yd yard yards",
    },
    "mass": {
        "kg": "kg kgs kilo kilos kilogram kilograms",
        "g": "gram grams gr",
        "lb": "lb lbs pound pounds",
        "oz": "oz ounce ounces",
        "st": "stone stones",
    },
    "volume": {
        "l": "liter liters litre litres",
        "ml": "ml milliliter milliliters millilitre millilitres",
        "gal": "gal gallon gallons",
        "cup": "cup cups",
        "tbsp": "tbsp tablespoon tablespoons",
        "tsp": "tsp teaspoon teaspoons",
        "floz": "floz",
        "pint": "pint pints",
        "quart": "quart quarts",
    },
    "temperature": {
        "c": "celsius centigrade °c",
        "f": "fahrenheit °f",
        "k": "kelvin",
    },
    "currency": {
        "usd": "usd dollar dollars $",
        "eur": "eur euro euros €",
        "gbp": "gbp sterling £",
        "jpy": "jpy yen ¥",
        "inr": "inr rupee rupees ₹",
        "chf": "chf franc francs",
        "cad": "cad",
        "aud": "aud",
        "btc": "btc",
    },
    "data": {
        "kb": "kb kilobyte kilobytes",
        "mb": "mb megabyte megabytes",
        "gb": "gb gigabyte gigabytes",
        "tb": "tb terabyte terabytes",
    },
    "speed": {"kmh": "kmh kph", "mph": "mph"},
    "time": {
        "s": "sec secs second seconds",
        "min": "min mins minute minutes",
        "h": "hr hrs hour hours",
        "d": "day days",
        "w": "week weeks",
        "mo": "month months",
        "y": "year years yr yrs",
        "ms": "ms millisecond milliseconds",
    },
}.items():
    for _unit, _words in _groups.items():
        for _word in _words.split():
            _UNITS[_word] = (_dimension, _unit)
# after a number only: one letter, or words that are common otherwise
_UNITS_AFTER_NUMBER = {
    "m": ("length", "m"),
    "g": ("mass", "g"),
    "l": ("volume", "l"),
    "c": ("temperature", "c"),
    "f": ("temperature", "f"),
    "k": ("thousands", "k"),
    "h": ("time", "h"),
    "s": ("time", "s"),
}

_QUESTION_WORDS = {"who": "who", "whom": "who", "whose": "who", "where": "where",
                   "when": "when", "why": "why"}  # fmt: skip
_QUESTION_PHRASES = re.compile(
    r"\b(?:what|which)\s+(?:year|date|day|time|month|century|decade)\b|"
    r"\bhow\s+come\b|\bwhat\s+(?:place|city|country)\b|\bwhat\s+(?:is|was)\s+the\s+reason\b"
)

_ALIASES = {
    "js": "javascript", "ts": "typescript", "py": "python", "usa": "us",
    "unitedstates": "us", "america": "us", "uk": "gb", "unitedkingdom": "gb",
    "britain": "gb", "greatbritain": "gb", "nyc": "newyork", "la": "losangeles",
    "mt": "mount", "st": "saint", "k8s": "kubernetes", "postgres": "postgresql",
    "mongo": "mongodb", "golang": "go", "eu": "europeanunion", "okay": "ok",
}  # fmt: skip

_STOPWORD_TEXT = """
    a an the and or but if of at by for with about against between into through during
    to from in out on off over under again further then once here there all any both each
    few other some such only own same so too very can will just should now i me my myself
    we our ours you your yours he him his she her it its they them their what which who
    whom whose this that these those am is are was were be been being have has had having
    do does did doing would could might must may shall get got gets getting how when where
    why whats hows please thanks thank hi hello hey wondering wonder know like want need
    tell explain help someone anyone way ways best good thing things really actually
    just also even still there's lot lots much many kind sort type use using used make
    makes making going one ones s t d ll m re ve im id ive okay ok sure mean means
    exactly quick quickly fast possible question trying try tried vs versus via per"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())

# alias target -> the names that stand for it ("gb" -> "uk", "unitedkingdom", ...)
_ALIAS_NAMES: dict[str, list[str]] = {}
for _name, _target in _ALIASES.items():
    _ALIAS_NAMES.setdefault(_target, []).append(_name)
for _target in list(_ALIAS_NAMES):
    _ALIAS_NAMES[_target].append(_target)
    for _name in list(_ALIAS_NAMES[_target]):
        _ALIAS_NAMES.setdefault(_name, []).extend(_ALIAS_NAMES[_target])

# a place and its people: "Japan" / "Japanese", "Italy" / "Italian"
_DEMONYM_ENDINGS = ("ese", "ian", "an", "n", "ish", "i", "ic")
