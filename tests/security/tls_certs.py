"""Throw-away TLS material for the transport tests, made with the ``openssl`` command line.

:func:`make_pki` writes a self-signed CA, a server certificate for ``127.0.0.1`` and
``localhost`` signed by it, a client certificate (for mutual TLS) signed by it, and a
second, unrelated CA that must never be trusted to vouch for the server. Keys are
P-256 (fast to generate); the extensions are what strict verifiers (Python 3.13's
``VERIFY_X509_STRICT``) require. Without ``openssl`` the test is skipped, or fails
when ``AIOCACHE_LLM_REQUIRE_REDIS=1`` (CI), like the other real-server tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Pki", "make_pki", "openssl_binary"]

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_CA_EXTENSIONS = [
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-addext", "subjectKeyIdentifier=hash",
]  # fmt: skip
_LEAF_EXTENSIONS = """\
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage={usage}
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=IP:127.0.0.1,DNS:localhost
"""


@dataclass(frozen=True)
class Pki:
    """Paths of the generated files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_ca_cert: Path


def openssl_binary() -> str:
    path = shutil.which("openssl")
    if path is None:
        if os.environ.get("AIOCACHE_LLM_REQUIRE_REDIS") == "1":
            pytest.fail("openssl binary not found (AIOCACHE_LLM_REQUIRE_REDIS=1)")
        pytest.skip("openssl binary not found: cannot generate TLS certificates")
    return path


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def _make_ca(openssl: str, directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _run(
        openssl, "req", "-x509", *_KEY, "-keyout", str(key), "-out", str(cert),
        "-days", "2", "-subj", f"/CN=aiocache_llm test {name}", *_CA_EXTENSIONS,
    )  # fmt: skip
    return cert, key


def _make_leaf(
    openssl: str, directory: Path, name: str, usage: str, ca: tuple[Path, Path]
) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(_LEAF_EXTENSIONS.format(usage=usage))
    _run(
        openssl, "req", *_KEY, "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}",
    )  # fmt: skip
    _run(
        openssl, "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions),
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Generate the CA, server, client and foreign-CA files in ``directory``."""
    openssl = openssl_binary()
    ca = _make_ca(openssl, directory, "ca")
    foreign_ca, _ = _make_ca(openssl, directory, "foreign-ca")
    server = _make_leaf(openssl, directory, "server", "serverAuth", ca)
    client = _make_leaf(openssl, directory, "client", "clientAuth", ca)
    return Pki(
        ca_cert=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        foreign_ca_cert=foreign_ca,
    )
