"""Suite-wide pytest setup.

The repository root goes on ``sys.path`` so tests can import the ``fuzz`` package (its
invariants run under Hypothesis too) and ``tests.strategies``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
