"""Helpers of the async adapter tests: each test runs on asyncio and on trio (anyio) under an
absolute deadline, on the adapter users import for that runtime; and a polling wait."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import anyio
import pytest
import sniffio

from rhizome_adapters import aio, anyio_adapter, trio_adapter

BACKENDS = ("asyncio", "trio")


def deadline(
    seconds: float = 10.0, *, backends: Sequence[str] = BACKENDS
) -> Callable[..., Callable[..., None]]:
    """Run an async test function on each of ``backends`` (``anyio.run``), failing it after
    ``seconds``; the test gets the backend as a parameter ``anyio_backend`` in its id."""

    def decorate(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
        @functools.wraps(test)
        def run(*args: Any, anyio_backend: str, **kwargs: Any) -> None:
            async def main() -> None:
                with anyio.fail_after(seconds):
                    await test(*args, **kwargs)

            anyio.run(main, backend=anyio_backend)

        signature = inspect.signature(test)
        extra = inspect.Parameter("anyio_backend", inspect.Parameter.KEYWORD_ONLY)
        run.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*signature.parameters.values(), extra]
        )
        return pytest.mark.parametrize("anyio_backend", list(backends))(run)

    return decorate


#: :func:`deadline` on asyncio only (tests that talk to an asyncio-only library).
on_asyncio = functools.partial(deadline, backends=("asyncio",))


def instance(**kwargs: Any) -> anyio_adapter.FederatedRhizomeDB:
    """A new ``FederatedRhizomeDB`` of the adapter users import for the running backend:
    :mod:`rhizome_adapters.aio` on asyncio, :mod:`rhizome_adapters.trio_adapter` on trio."""
    if sniffio.current_async_library() == "trio":
        return trio_adapter.FederatedRhizomeDB(**kwargs)
    return aio.FederatedRhizomeDB(**kwargs)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; ``TimeoutError`` after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)
