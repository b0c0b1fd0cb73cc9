"""Suite-wide pytest setup.

The repository root goes on ``sys.path`` so tests can import the ``fuzz`` package (its
invariants run under Hypothesis too) and ``tests.strategies``.

Hypothesis profiles: ``default`` (no deadline: the machines are shared and noisy) and ``fuzz``
(many more examples; ``.ci/run`` uses it when atheris cannot be installed). Choose one with
``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

settings.register_profile("default", deadline=None)
settings.register_profile(
    "fuzz", max_examples=5_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority for the TLS tests."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 and localhost, issued by ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test CA only."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
