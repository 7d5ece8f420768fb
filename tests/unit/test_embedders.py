"""HashingEmbedder: deterministic, dependency-free, paraphrase-tolerant embeddings for tests."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from aiocache_llm import InvalidInputError, InvalidInputTypeError
from aiocache_llm.embedders import HashingEmbedder

PARAPHRASES = [
    ("What is the capital of France?", "what's the capital of france"),
    ("What is the capital of France?", "France: what is the capital?"),
    ("How do I reverse a list in Python?", "How can I reverse a list in python"),
    ("Explain the theory of relativity in simple terms", "explain relativity theory simply"),
    ("Tell me a joke about cats", "tell me a funny joke about cats!"),
]
UNRELATED = [
    ("What is the capital of France?", "How do I reverse a list in Python?"),
    ("What is the capital of France?", "Tell me a joke about cats"),
    ("How do I reverse a list in Python?", "Best recipe for chocolate chip cookies"),
    ("Explain the theory of relativity in simple terms", "Book a table for two tonight"),
]


def similarity(embed: HashingEmbedder, a: str, b: str) -> float:
    return float(np.dot(embed(a), embed(b)))


def test_returns_a_float32_unit_vector_of_the_dimension() -> None:
    embed = HashingEmbedder(dimension=64)
    vector = embed("Hello world")
    assert vector.dtype == np.float32
    assert vector.shape == (64,)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-6)
    assert embed.dimension == 64
    assert repr(embed) == "HashingEmbedder(dimension=64)"


def test_same_text_gives_the_same_vector_in_every_instance() -> None:
    text = "What is the capital of France?"
    assert np.array_equal(HashingEmbedder()(text), HashingEmbedder()(text))


def test_same_text_gives_the_same_vector_in_another_process() -> None:
    # str hashes are salted per process; processes sharing a Redis cache must agree
    text = "What is the capital of France?"
    code = (
        "import sys; from aiocache_llm.embedders import HashingEmbedder; "
        "sys.stdout.write(HashingEmbedder(32)(sys.argv[1]).tobytes().hex())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, text],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},
    )
    assert bytes.fromhex(other.stdout) == HashingEmbedder(32)(text).tobytes()


def test_case_punctuation_and_word_order_do_not_matter() -> None:
    embed = HashingEmbedder()
    assert np.array_equal(embed("Hello, World!"), embed("world hello"))
    assert np.array_equal(embed("Is it   RAINING?"), embed("raining is it"))


@pytest.mark.parametrize(("a", "b"), PARAPHRASES)
def test_paraphrases_score_high(a: str, b: str) -> None:
    assert similarity(HashingEmbedder(), a, b) >= 0.75


@pytest.mark.parametrize(("a", "b"), UNRELATED)
def test_unrelated_sentences_score_low(a: str, b: str) -> None:
    assert similarity(HashingEmbedder(), a, b) <= 0.4


def test_every_paraphrase_scores_above_every_unrelated_pair() -> None:
    embed = HashingEmbedder()
    lowest_paraphrase = min(similarity(embed, a, b) for a, b in PARAPHRASES)
    highest_unrelated = max(similarity(embed, a, b) for a, b in UNRELATED)
    assert lowest_paraphrase > highest_unrelated + 0.3


def test_text_of_symbols_only_still_embeds() -> None:
    embed = HashingEmbedder()
    assert np.linalg.norm(embed("?!")) == pytest.approx(1.0, abs=1e-6)
    assert not np.array_equal(embed("?!"), embed("..."))


def test_tiny_dimensions_never_return_a_zero_vector() -> None:
    embed = HashingEmbedder(dimension=1)
    for text in ("a", "ab", "hello world", "x y z"):
        assert float(np.linalg.norm(embed(text))) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("text", "error"),
    [(None, InvalidInputTypeError), (b"bytes", InvalidInputTypeError), ("   ", InvalidInputError)],
    ids=["none", "bytes", "blank"],
)
def test_bad_text_raises(text: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        HashingEmbedder()(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dimension", "error"),
    [(0, InvalidInputError), (-3, InvalidInputError), (2.5, InvalidInputTypeError)],
)
def test_bad_dimension_raises(dimension: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="dimension"):
        HashingEmbedder(dimension)  # type: ignore[arg-type]
