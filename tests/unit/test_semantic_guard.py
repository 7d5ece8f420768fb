"""SemanticGuard: each rule alone refuses what it should and accepts paraphrases it should.

Every rule has examples it must refuse (the texts differ in what that rule looks at)
and examples it must accept (the facts it looks at are the same, in other words).
The whole guard must accept every accepted example of every rule: a rule may not
refuse a paraphrase another rule's examples keep.
"""

from __future__ import annotations

import pytest

from aiocache_llm import InvalidInputError, InvalidInputTypeError, SemanticGuard
from aiocache_llm.semantic import RULES
from aiocache_llm.semantic.features import _features

REFUSE: dict[str, list[tuple[str, str]]] = {
    "numbers": [
        (
            "How do I get the last 3 elements of a list?",
            "How do I get the last 5 elements of a list?",
        ),
        ("We have 1,000 users", "We have 100 users"),
        ("Two tickets to Rome please", "Three tickets to Rome please"),
        ("Who fought in World War II?", "Who fought in World War I?"),
        ("I was charged $49 instead of $39", "I was charged $39 instead of $49"),
        ("Who led Britain in the first world war?", "Who led Britain in the second world war?"),
        ("Is Node 18 still supported?", "Is Node 20 still supported?"),
        ("Round to 2.5", "Round to 2.05"),
    ],
    "dates": [
        ("Is the museum open on Monday?", "Is the museum open on Tuesday?"),
        ("Weather in Paris in July", "Weather in Paris in August"),
        ("Can we meet at 3pm?", "Can we meet at 4pm?"),
        ("Any flights tomorrow?", "Any flights today?"),
        ("Sales figures for last year", "Sales figures for next year"),
        ("Travel tips for Japan in winter", "Travel tips for Japan in summer"),
        ("What is the monthly fee?", "What is the annual fee?"),
    ],
    "negation": [
        ("Which countries can I visit with a visa?", "Which countries can I visit without a visa?"),
        ("Which cheeses melt well on pizza?", "Which cheeses don't melt well on pizza?"),
        ("Is it safe to refreeze thawed chicken?", "Is it unsafe to refreeze thawed chicken?"),
        ("Reasons to refinance a mortgage", "Reasons not to refinance a mortgage"),
        ("Why does the build never finish?", "Why does the build finish?"),
        ("Is that legal in Spain?", "Is that illegal in Spain?"),
    ],
    "entities": [
        ("How do I connect to PostgreSQL from Python?", "How do I connect to MySQL from Python?"),
        ("What's the best time to visit Iceland?", "What's the best time to visit Norway?"),
        ("Do I need a visa for Japan from the US?", "Do I need a visa for Japan from Canada?"),
        ("What does os.path.join do?", "What does os.path.split do?"),
        ("Is C# hard to learn?", "Is F# hard to learn?"),
        ("how do I use the get_user function", "how do I use the get_users_by_id function"),
        ("Is Java hard to learn?", "Is JavaScript hard to learn?"),
    ],
    "units": [
        ("How far is Paris from Berlin in km?", "How far is Paris from Berlin in miles?"),
        ("How long to roast at 200C?", "How long to roast at 200F?"),
        ("Taxi to Manhattan cost in dollars", "Taxi to Manhattan cost in euros"),
        ("How many tablespoons are in a cup?", "How many teaspoons are in a cup?"),
        ("Can I email a 2 GB file?", "Can I email a 2 MB file?"),
    ],
    "direction": [
        ("How do I increase the heap size?", "How do I decrease the heap size?"),
        ("Sort a list in ascending order", "Sort a list in descending order"),
        ("Trains from Paris to Brussels", "Trains from Brussels to Paris"),
        ("Convert a JSON string to a dict", "Convert a dict to a JSON string"),
        ("Is Python faster than Java?", "Is Java faster than Python?"),
        ("What should I eat before a run?", "What should I eat after a run?"),
        ("Max value of an int in C", "Min value of an int in C"),
        ("Convert 350 Fahrenheit to Celsius", "Convert 350 Celsius to Fahrenheit"),
    ],
    "question": [
        ("When was the Eiffel Tower built?", "Where was the Eiffel Tower built?"),
        ("Who invented the telephone?", "When was the telephone invented?"),
        ("My build fails, why?", "My build fails, where?"),
    ],
    "substitution": [
        ("How long do I roast a chicken?", "How long do I roast a turkey?"),
        ("What can I use instead of buttermilk?", "What can I use instead of heavy cream?"),
        ("Things to do in vienna with kids", "Things to do in vienna for couples"),
        ("What are the symptoms of measles?", "What are the symptoms of chickenpox?"),
        ("Is magnesium good for sleep?", "Is melatonin good for sleep?"),
        ("Is water damage covered by the warranty?", "Is water damage excluded from the warranty?"),
    ],
}

ACCEPT: dict[str, list[tuple[str, str]]] = {
    "numbers": [
        ("Itinerary for 3 days in Kyoto", "Itinerary for three days in Kyoto"),
        ("Is zero an even number?", "Is 0 an even number?"),
        ("We have 1,000 users", "we have 1000 users"),
        ("It costs 2.50", "It costs 2.5"),
        ("Which one is better?", "Which is better?"),
        ("I bought twenty five apples", "I bought 25 apples"),
        ("When did World War II end?", "when did world war 2 end"),
        ("Is $50,000 a good salary?", "Is a 50k salary good?"),
        ("What's the 401(k) limit?", "what is the 401k limit"),
        ("What are the symptoms of COVID-19?", "What are the symptoms of COVID-19 exactly?"),
        ("Can I take 400 mg every 4 hours?", "Is taking 400 mg every four hours okay?"),
    ],
    "dates": [
        ("Can we meet at 3pm?", "Can we meet at 15:00?"),
        ("How much protein do I need per day?", "How much protein do I need daily?"),
        ("Is the museum open on Mondays?", "is the museum open on monday"),
        ("What may I bring on board?", "What can I bring on board?"),
        ("Events in Paris in March", "events in paris in March?"),
    ],
    "negation": [
        ("Why doesn't my code compile?", "Why does my code not compile?"),
        ("I can't log in to my account", "I cannot log into my account"),
        ("Why isn't it working?", "why is it not working"),
        ("It is not not allowed", "It is allowed"),
        (
            "How do I thicken a sauce without flour?",
            "Ways to thicken a sauce if I don't have flour?",
        ),
    ],
    "entities": [
        ("how do i reverse a list in python", "How do I reverse a list in Python?"),
        (
            "Which plug adapter do I need for the UK?",
            "Which plug adapter do I need for the United Kingdom?",
        ),
        ("How do I parse a string in JS?", "How do I parse a string in JavaScript?"),
        ("How tall is Mount Everest?", "how tall is mt everest"),
        (
            "Do I need an IDP to drive in Japan?",
            "Do I need an international driving permit to drive in Japan?",
        ),
        ("Is it OK to leave butter out?", "is it ok to leave butter out"),
        (
            "Whats the diffrence between == and === in javascript",
            "What's the difference between == and === in JavaScript?",
        ),
        ("Things to do in Zürich", "things to do in zurich"),
        ("Are trains in Japan on time?", "Are Japanese trains on time?"),
    ],
    "units": [
        ("How far is it in km?", "How far is it in kilometers?"),
        ("How long to bake a cake at 180C?", "At 180 degrees C, how long should a cake bake?"),
        ("How far is Paris from Berlin in km?", "How far is Paris from Berlin?"),
        ("Is $20 a good tip?", "Is 20 dollars a good tip?"),
    ],
    "direction": [
        ("Python vs Java for data science", "Java vs Python for data science"),
        (
            "Are there direct trains from Paris to Amsterdam?",
            "Is there a direct train from Paris to Amsterdam?",
        ),
        ("How do I raise my credit score?", "How do I increase my credit score?"),
        (
            "How do I get from Heathrow to central London?",
            "Best way to travel from Heathrow airport into central London?",
        ),
    ],
    "question": [
        ("When did the Berlin Wall come down?", "In what year did the Berlin Wall fall?"),
        ("The app crashes when I open it", "Why does the app crash when I open it?"),
        ("Where is the Louvre?", "where's the louvre"),
    ],
    "substitution": [
        ("how do i calculate the area of a cirle", "How do I calculate the area of a circle?"),
        ("how to centre a div with css", "How to center a div with CSS?"),
        ("Can I bring a powerbank in my luggage?", "Can I bring a power bank in my luggage?"),
        ("How do I update my billing info?", "How do I update my billing information?"),
        (
            "What is a closure in JavaScript?",
            "Can you please explain what a closure is in JavaScript? Thanks!",
        ),
        (
            "Who wrote the Declaration of Independence?",
            "Who was the author of the Declaration of Independence?",
        ),
    ],
}

NON_LATIN = [
    ("東京の天気は", "大阪の天気は"),  # no word rule applies to Japanese: passes
    ("Какая погода в Москве?", "Какая погода в Москве сегодня?"),
    ("ما هو الطقس اليوم؟", "ما هو الطقس غدا؟"),
]


def _cases(table: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str, str]]:
    return [(rule, a, b) for rule, pairs in table.items() for a, b in pairs]


def test_every_rule_has_examples_both_ways() -> None:
    assert set(REFUSE) == set(ACCEPT) == set(RULES)


@pytest.mark.parametrize(("rule", "query", "candidate"), _cases(REFUSE))
def test_each_rule_alone_refuses_what_it_should(rule: str, query: str, candidate: str) -> None:
    guard = SemanticGuard(rules=[rule])
    assert guard.explain(query, candidate) == rule
    assert guard(query, candidate, 0.97) is False
    assert guard(candidate, query, 0.97) is False  # symmetric
    # and so does the whole guard (possibly through an earlier rule)
    assert SemanticGuard()(query, candidate, 0.97) is False


@pytest.mark.parametrize(("rule", "query", "candidate"), _cases(ACCEPT))
def test_each_rule_alone_accepts_paraphrases_that_keep_its_facts(
    rule: str, query: str, candidate: str
) -> None:
    assert SemanticGuard(rules=[rule])(query, candidate, 0.9) is True
    assert SemanticGuard(rules=[rule])(candidate, query, 0.9) is True


@pytest.mark.parametrize(("rule", "query", "candidate"), _cases(ACCEPT))
def test_the_whole_guard_accepts_every_paraphrase(rule: str, query: str, candidate: str) -> None:
    guard = SemanticGuard()
    assert guard.explain(query, candidate) is None
    assert guard.explain(candidate, query) is None


@pytest.mark.parametrize(("query", "candidate"), NON_LATIN)
def test_other_scripts_pass_the_rules_that_cannot_apply(query: str, candidate: str) -> None:
    assert SemanticGuard()(query, candidate, 0.9) is True


def test_digits_are_compared_in_any_script() -> None:
    assert SemanticGuard()("東京まで3日", "東京まで5日", 0.9) is False


def test_identical_and_empty_texts_pass() -> None:
    guard = SemanticGuard()
    assert guard("same text 42", "same text 42", 1.0) is True
    assert guard("", "", 1.0) is True
    assert guard("", "?!", 1.0) is True


def test_a_rule_left_out_does_not_refuse() -> None:
    without_numbers = SemanticGuard(rules=[r for r in RULES if r != "numbers"])
    assert without_numbers("last 3 elements of a list", "last 5 elements of a list", 0.9)
    assert "numbers" not in repr(without_numbers)
    assert repr(SemanticGuard()) == "SemanticGuard()"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rules": ["numbers", "colours"]}, InvalidInputError),
        ({"rules": "numbers"}, InvalidInputTypeError),
        ({"max_substitution": 0}, InvalidInputError),
        ({"max_substitution": 6}, InvalidInputError),
        ({"max_substitution": 2.0}, InvalidInputTypeError),
    ],
)
def test_bad_configuration_raises(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        SemanticGuard(**kwargs)  # type: ignore[arg-type]


def test_non_str_texts_raise_a_type_error() -> None:
    with pytest.raises(InvalidInputTypeError):
        SemanticGuard()("text", None, 0.9)  # type: ignore[arg-type]


def test_max_substitution_bounds_what_counts_as_a_swap() -> None:
    query, candidate = "Recipes for chicken soup tonight", "Recipes for lentil curry tonight"
    assert SemanticGuard(rules=["substitution"], max_substitution=2)(query, candidate, 0.9) is False
    assert SemanticGuard(rules=["substitution"], max_substitution=1)(query, candidate, 0.9) is True


def test_features_are_computed_once_per_text() -> None:
    _features.cache_clear()
    guard = SemanticGuard()
    for candidate in ("Trains from Paris to Lyon", "Trains from Paris to Nice", "Trains to Paris"):
        guard("Trains from Paris to Brussels", candidate, 0.9)
    info = _features.cache_info()
    assert (info.misses, info.hits) == (4, 2)  # the query was analysed once
