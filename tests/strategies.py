"""Hypothesis strategies shared by the test suite.

Everything generated here is *valid* per PROTOCOL.md and spec section 2.1.1, so any value drawn
must survive ``decode(encode(value))`` unchanged. Integers are kept within JavaScript's safe range
(what the TypeScript reference can represent exactly) and floats are finite (JSON has no NaN or
infinity; msgspec round-trips finite floats exactly).

Field strategies can be narrowed (``deltas(authors=st.sampled_from(["a", "b"]))``) so that
filter tests draw deltas and filters from the same small pools and actually get matches.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from rhizome_proto import (
    MAX_TIMESTAMP,
    PROTOCOL_VERSION,
    Delta,
    DeltaAck,
    DeltaFilter,
    DeltaMessage,
    DeltaNack,
    DeltasAck,
    DeltasMessage,
    ErrorCode,
    ErrorMessage,
    FederationConfig,
    Hello,
    HelloAck,
    Pause,
    Ping,
    Pointer,
    Pong,
    ReconnectConfig,
    Reference,
    Resume,
    SyncBatch,
    SyncComplete,
    SyncRequest,
    SyncStart,
    TimestampRange,
)
from rhizome_proto._messages import Message

__all__ = [
    "JS_MAX_SAFE_INTEGER",
    "MESSAGE_STRATEGIES",
    "PointerTarget",
    "delta_filters",
    "delta_lists",
    "deltas",
    "deterministic",
    "federation_configs",
    "finite_floats",
    "json_objects",
    "json_values",
    "messages",
    "non_empty_text",
    "non_negative_numbers",
    "pointer_targets",
    "pointers",
    "reconnect_configs",
    "references",
    "safe_integers",
    "timestamp_ranges",
    "timestamps",
]

#: ``Number.MAX_SAFE_INTEGER``: the largest integer both implementations represent exactly.
JS_MAX_SAFE_INTEGER = 2**53 - 1

PointerTarget = Reference | str | bool | int | float


#: Hypothesis' own default number of examples; a loaded profile above it is a fuzzing run.
_DEFAULT_EXAMPLES = 100


def deterministic(max_examples: int = 100) -> settings:
    """Settings for the suite's property tests: the same examples on every run, no database.

    Under a profile that asks for more examples than Hypothesis' default (``HYPOTHESIS_PROFILE=
    fuzz``, the CI fallback when atheris is missing), the profile's budget applies instead, with
    fresh random examples on each run. Other settings come from the loaded profile.
    """
    loaded = settings.default
    if loaded is not None and loaded.max_examples > _DEFAULT_EXAMPLES:
        return settings(
            max_examples=max(max_examples, loaded.max_examples), database=None, deadline=None
        )
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None)


def non_empty_text(max_size: int = 16) -> SearchStrategy[str]:
    """Non-empty strings over all of Unicode except surrogates (so non-ASCII included)."""
    return st.text(min_size=1, max_size=max_size)


def finite_floats() -> SearchStrategy[float]:
    return st.floats(allow_nan=False, allow_infinity=False)


def safe_integers(min_value: int = -JS_MAX_SAFE_INTEGER) -> SearchStrategy[int]:
    return st.integers(min_value=min_value, max_value=JS_MAX_SAFE_INTEGER)


def timestamps() -> SearchStrategy[int | float]:
    """Valid timestamps: an int or a float in ``(0, 2**53 - 1]``."""
    return st.one_of(
        st.integers(min_value=1, max_value=MAX_TIMESTAMP),
        st.floats(
            min_value=0.0,
            max_value=float(MAX_TIMESTAMP),
            exclude_min=True,
            allow_nan=False,
            allow_infinity=False,
        ),
    )


def non_negative_numbers() -> SearchStrategy[int | float]:
    """Counts and delays that may be ``0``: a non-negative int or finite float."""
    return st.one_of(
        safe_integers(min_value=0),
        st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    )


def references(
    ids: SearchStrategy[str] | None = None, contexts: SearchStrategy[str] | None = None
) -> SearchStrategy[Reference]:
    """``{"id": str, "context"?: str}`` with non-empty strings."""
    return st.builds(
        Reference,
        id=ids if ids is not None else non_empty_text(),
        context=st.none() | (contexts if contexts is not None else non_empty_text()),
    )


def pointer_targets(
    refs: SearchStrategy[Reference] | None = None,
) -> SearchStrategy[PointerTarget]:
    """A Reference, a string, a bool, a (JS-safe) int or a finite float."""
    return st.one_of(
        refs if refs is not None else references(),
        st.text(max_size=16),
        st.booleans(),
        safe_integers(),
        finite_floats(),
    )


def pointers(
    roles: SearchStrategy[str] | None = None,
    targets: SearchStrategy[PointerTarget] | None = None,
) -> SearchStrategy[Pointer]:
    return st.builds(
        Pointer,
        role=roles if roles is not None else non_empty_text(),
        target=targets if targets is not None else pointer_targets(),
    )


def deltas(
    *,
    ids: SearchStrategy[str] | None = None,
    times: SearchStrategy[int | float] | None = None,
    authors: SearchStrategy[str] | None = None,
    systems: SearchStrategy[str] | None = None,
    pointer_items: SearchStrategy[Pointer] | None = None,
    max_pointers: int = 4,
) -> SearchStrategy[Delta]:
    """Valid deltas (spec section 2.1.1); each field strategy may be replaced."""
    return st.builds(
        Delta,
        id=ids if ids is not None else non_empty_text(),
        timestamp=times if times is not None else timestamps(),
        author=authors if authors is not None else non_empty_text(),
        system=systems if systems is not None else non_empty_text(),
        pointers=st.lists(
            pointer_items if pointer_items is not None else pointers(), max_size=max_pointers
        ).map(tuple),
    )


def delta_lists(
    *,
    unique_ids: bool = False,
    min_size: int = 0,
    max_size: int = 8,
    elements: SearchStrategy[Delta] | None = None,
) -> SearchStrategy[list[Delta]]:
    """Lists of valid deltas; with ``unique_ids`` no two share an id."""
    strategy = elements if elements is not None else deltas()
    if unique_ids:
        return st.lists(strategy, min_size=min_size, max_size=max_size, unique_by=lambda d: d.id)
    return st.lists(strategy, min_size=min_size, max_size=max_size)


def _string_tuples(values: SearchStrategy[str]) -> SearchStrategy[tuple[str, ...] | None]:
    return st.none() | st.lists(values, max_size=3).map(tuple)


def timestamp_ranges(
    bounds: SearchStrategy[int | float] | None = None,
) -> SearchStrategy[TimestampRange]:
    # Bounds are any number: 0 ("from the beginning") and negatives are valid too.
    values = bounds if bounds is not None else timestamps() | safe_integers() | finite_floats()
    return st.builds(TimestampRange, start=st.none() | values, end=st.none() | values)


def delta_filters(
    *,
    strings: SearchStrategy[str] | None = None,
    bounds: SearchStrategy[int | float] | None = None,
) -> SearchStrategy[DeltaFilter]:
    """Filters; every field independently absent (``None``) or present (possibly ``()``)."""
    values = strings if strings is not None else st.text(max_size=8)
    return st.builds(
        DeltaFilter,
        ids=_string_tuples(values),
        target_ids=_string_tuples(values),
        target_contexts=_string_tuples(values),
        authors=_string_tuples(values),
        systems=_string_tuples(values),
        timestamp_range=st.none() | timestamp_ranges(bounds),
        include_negated=st.none() | st.booleans(),
    )


def json_values(*, finite: bool = True, max_leaves: int = 8) -> SearchStrategy[Any]:
    """JSON-ish Python values: dicts, lists and scalars (non-finite floats unless ``finite``)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=not finite, allow_infinity=not finite),
        st.text(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.text(max_size=8), children, max_size=3),
        ),
        max_leaves=max_leaves,
    )


def json_objects(*, finite: bool = True) -> SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=8), json_values(finite=finite), max_size=4)


def _trust_policies() -> SearchStrategy[dict[str, Any]]:
    names = st.lists(non_empty_text(8), max_size=3)
    return st.one_of(
        st.just({"type": "permissive"}),
        st.builds(lambda a: {"type": "author", "trustedAuthors": a}, names),
        st.builds(lambda s: {"type": "system", "trustedSystems": s}, names),
        json_objects(),
    )


def reconnect_configs() -> SearchStrategy[ReconnectConfig]:
    return st.builds(
        ReconnectConfig,
        enabled=st.none() | st.booleans(),
        max_attempts=st.none() | safe_integers(min_value=0),
        initial_delay=st.none() | non_negative_numbers(),
        max_delay=st.none() | non_negative_numbers(),
        backoff_multiplier=st.none() | non_negative_numbers(),
    )


def federation_configs() -> SearchStrategy[FederationConfig]:
    return st.builds(
        FederationConfig,
        mode=st.none() | st.sampled_from(["push", "pull", "bidirectional"]),
        initial_sync=st.none() | st.sampled_from(["full", "from_timestamp", "none"]),
        sync_from_timestamp=st.none() | non_negative_numbers(),
        push_filter=st.none() | delta_filters(),
        pull_filter=st.none() | delta_filters(),
        reconnect=st.none() | reconnect_configs(),
        trust_policy=st.none() | _trust_policies(),
    )


_counts = safe_integers(min_value=0)
_extension_lists = st.just(msgspec.UNSET) | st.lists(st.text(max_size=12), max_size=3).map(tuple)
_cursors = st.none() | st.text(max_size=24)
_error_codes = st.sampled_from([c.value for c in ErrorCode]) | st.text(max_size=16)
_windows = st.just(msgspec.UNSET) | safe_integers(min_value=1)

#: One strategy per message class; the keys are exactly the classes of ``MESSAGE_TYPES``
#: (the 14 of v1 and the two of extension ``batch``).
MESSAGE_STRATEGIES: dict[type[Any], SearchStrategy[Any]] = {
    Hello: st.builds(
        Hello,
        timestamp=timestamps(),
        system_id=non_empty_text(),
        config=federation_configs(),
        protocol=st.just(PROTOCOL_VERSION) | st.text(max_size=24),
        extensions=_extension_lists,
        window=_windows,
    ),
    HelloAck: st.builds(
        HelloAck,
        timestamp=timestamps(),
        system_id=non_empty_text(),
        link_id=st.text(max_size=36),
        protocol=st.just(PROTOCOL_VERSION) | st.text(max_size=24),
        extensions=_extension_lists,
        window=_windows,
    ),
    DeltaMessage: st.builds(DeltaMessage, timestamp=timestamps(), delta=deltas()),
    DeltaAck: st.builds(DeltaAck, timestamp=timestamps(), delta_id=st.text(max_size=16)),
    DeltaNack: st.builds(
        DeltaNack, timestamp=timestamps(), delta_id=st.text(max_size=16), reason=st.text()
    ),
    DeltasMessage: st.builds(
        DeltasMessage,
        timestamp=timestamps(),
        deltas=delta_lists(min_size=1, max_size=4).map(tuple),
    ),
    DeltasAck: st.builds(DeltasAck, timestamp=timestamps(), up_to=_counts),
    SyncRequest: st.builds(
        SyncRequest,
        timestamp=timestamps(),
        filter=st.none() | delta_filters(),
        from_timestamp=st.none() | non_negative_numbers(),
        from_cursor=_cursors,
    ),
    SyncStart: st.builds(
        SyncStart,
        timestamp=timestamps(),
        total_deltas=_counts,
        batch_size=safe_integers(min_value=1),
    ),
    SyncBatch: st.builds(
        SyncBatch,
        timestamp=timestamps(),
        deltas=delta_lists(max_size=4).map(tuple),
        batch_number=_counts,
        is_last_batch=st.booleans(),
        cursor=_cursors,
    ),
    SyncComplete: st.builds(
        SyncComplete, timestamp=timestamps(), deltas_processed=_counts, cursor=_cursors
    ),
    Pause: st.builds(Pause, timestamp=timestamps()),
    Resume: st.builds(Resume, timestamp=timestamps()),
    Ping: st.builds(Ping, timestamp=timestamps()),
    Pong: st.builds(Pong, timestamp=timestamps()),
    ErrorMessage: st.builds(
        ErrorMessage,
        timestamp=timestamps(),
        code=_error_codes,
        message=st.text(),
        fatal=st.none() | st.booleans(),
    ),
}


def messages() -> SearchStrategy[Message]:
    """Any valid message, of any class (v1's 14 and the extensions' two)."""
    return st.one_of(*MESSAGE_STRATEGIES.values())
