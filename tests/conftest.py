"""Suite-wide pytest setup.

The repository root goes on ``sys.path`` so tests can import the ``fuzz`` package (its
invariants run under Hypothesis too) and ``tests.strategies``.

Hypothesis profiles: ``default`` (no deadline: the machines are shared and noisy) and ``fuzz``
(many more examples; ``.ci/run`` uses it when atheris cannot be installed). Choose one with
``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

settings.register_profile("default", deadline=None)
settings.register_profile(
    "fuzz", max_examples=5_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
