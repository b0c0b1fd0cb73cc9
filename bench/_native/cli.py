"""``rhizome`` on the frozen native asyncio adapter (``python -m bench._native.cli ...``)."""

from __future__ import annotations

import sys

from bench._native import aio
from rhizome_adapters import cli

cli.FederatedRhizomeDB = aio.FederatedRhizomeDB  # type: ignore[misc, assignment]

if __name__ == "__main__":
    sys.exit(cli.main())
