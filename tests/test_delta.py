"""The delta model: validity (spec section 2.1.1) and immutability of Delta, Pointer, Reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given

from rhizome_proto import (
    MAX_TIMESTAMP,
    Delta,
    InvalidDeltaError,
    Pointer,
    Reference,
    validate_delta,
)
from tests.strategies import deltas, deterministic, pointers, references

VALID = Delta(
    id="d1",
    timestamp=1795624086443,
    author="alice",
    system="sys-a",
    pointers=(
        Pointer("movie", Reference("m1", "reviews")),
        Pointer("about", Reference("m2")),
        Pointer("text", "héllo ✓"),
        Pointer("empty", ""),
        Pointer("rating", 3),
        Pointer("negative", -7),
        Pointer("score", 2.5),
        Pointer("flag", False),
    ),
)


def make(**changes: Any) -> Delta:
    """``VALID`` with some fields replaced, without any checking."""
    fields: dict[str, Any] = {
        "id": VALID.id,
        "timestamp": VALID.timestamp,
        "author": VALID.author,
        "system": VALID.system,
        "pointers": VALID.pointers,
    }
    fields.update(changes)
    return Delta(**fields)


def with_target(target: Any, *, index: int = 0) -> Delta:
    """A delta whose pointer number ``index`` (after valid ones) has ``target``."""
    before = tuple(Pointer(f"ok{i}", i) for i in range(index))
    return make(pointers=(*before, Pointer("r", target)))


@deterministic(max_examples=120)
@given(deltas())
def test_valid_deltas_are_accepted_unchanged(delta: Delta) -> None:
    assert validate_delta(delta) == delta


def test_valid_examples() -> None:
    assert validate_delta(VALID) == VALID
    assert validate_delta(make(pointers=())) == make(pointers=())
    assert validate_delta(make(timestamp=MAX_TIMESTAMP)).timestamp == MAX_TIMESTAMP
    assert validate_delta(make(timestamp=0.001)).timestamp == 0.001
    assert validate_delta(make(timestamp=float(MAX_TIMESTAMP))).timestamp == MAX_TIMESTAMP
    assert validate_delta(make(id="δ-1", author="作者", system="系统")).id == "δ-1"


def test_validate_keeps_int_and_float_timestamps_apart() -> None:
    assert type(validate_delta(make(timestamp=5)).timestamp) is int
    assert type(validate_delta(make(timestamp=5.0)).timestamp) is float


def test_validate_normalises_a_pointer_list_to_a_tuple() -> None:
    delta = make(pointers=[Pointer("r", 1)])
    validated = validate_delta(delta)
    assert validated.pointers == (Pointer("r", 1),)
    assert isinstance(validated.pointers, tuple)


def assert_invalid(delta: Any, path: str, delta_id: str | None = "d1") -> InvalidDeltaError:
    with pytest.raises(InvalidDeltaError) as info:
        validate_delta(delta)
    assert f"`{path}`" in str(info.value), str(info.value)
    assert info.value.delta_id == delta_id
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize("field", ["author", "system"])
@pytest.mark.parametrize("value", ["", None, 5, 1.5, ["a"], {"a": "b"}])
def test_author_and_system_must_be_non_empty_strings(field: str, value: Any) -> None:
    assert_invalid(make(**{field: value}), f"$.{field}")


@pytest.mark.parametrize("value", ["", None, 5])
def test_id_must_be_a_non_empty_string(value: Any) -> None:
    assert_invalid(make(id=value), "$.id", delta_id=None)


@pytest.mark.parametrize(
    "timestamp",
    [
        0,
        0.0,
        -0.0,
        -1,
        -1795624086443,
        -0.5,
        math.nan,
        math.inf,
        -math.inf,
        True,
        False,
        None,
        "1795624086443",
        MAX_TIMESTAMP + 1,
        float(2**53),
        1e300,
    ],
)
def test_timestamp_must_be_a_positive_number(timestamp: Any) -> None:
    assert_invalid(make(timestamp=timestamp), "$.timestamp")


def test_pointers_must_be_an_array() -> None:
    assert_invalid(make(pointers=None), "$.pointers")
    assert_invalid(make(pointers="abc"), "$.pointers")
    assert_invalid(make(pointers=(("r", 1),)), "$.pointers[0]")


@pytest.mark.parametrize("index", [0, 2])
def test_role_must_be_non_empty(index: int) -> None:
    before = tuple(Pointer(f"ok{i}", i) for i in range(index))
    assert_invalid(make(pointers=(*before, Pointer("", 1))), f"$.pointers[{index}].role")
    assert_invalid(make(pointers=(*before, Pointer(None, 1))), f"$.pointers[{index}].role")  # type: ignore[arg-type]


@pytest.mark.parametrize("index", [0, 3])
@pytest.mark.parametrize(
    ("target", "suffix"),
    [
        (Reference(""), ".id"),
        (Reference("", "ctx"), ".id"),
        (Reference("x", ""), ".context"),
        (Reference(None), ".id"),  # type: ignore[arg-type]
        (Reference("x", 5), ".context"),  # type: ignore[arg-type]
        (None, ""),
        ([1, 2], ""),
        ((), ""),
        ([], ""),
        ({"id": "x", "context": "c", "extra": 1}, ""),
        ({"id": "x", "note": None}, ""),
        ({"nested": {"id": "x"}}, ""),
        ({}, ""),
        ({"id": ""}, ".id"),
        ({"id": "x", "context": ""}, ".context"),
        (math.nan, ""),
        (math.inf, ""),
        (-math.inf, ""),
    ],
)
def test_invalid_targets(index: int, target: Any, suffix: str) -> None:
    assert_invalid(with_target(target, index=index), f"$.pointers[{index}].target{suffix}")


@pytest.mark.parametrize("target", [object(), {1, 2}.__iter__(), Delta])
def test_unencodable_targets_are_invalid(target: Any) -> None:
    with pytest.raises(InvalidDeltaError) as info:
        validate_delta(with_target(target))
    assert info.value.delta_id == "d1"


@pytest.mark.parametrize("value", [1, "d1", None, {"id": "d1"}, Pointer("r", 1), VALID.pointers])
def test_only_deltas_are_deltas(value: Any) -> None:
    with pytest.raises(InvalidDeltaError) as info:
        validate_delta(value)
    assert info.value.delta_id is None


def test_a_dict_that_looks_like_a_reference_is_a_reference() -> None:
    # A plain mapping with exactly the Reference keys is the wire form of a Reference.
    validated = validate_delta(with_target({"id": "x", "context": "c"}))
    assert validated.pointers[0].target == Reference("x", "c")


def test_first_broken_rule_is_reported_with_the_readable_id() -> None:
    error = assert_invalid(make(author="", system=""), "$.author")
    assert "length >= 1" in str(error)


def test_invalid_delta_error_defaults() -> None:
    error = InvalidDeltaError("nope")
    assert str(error) == "nope"
    assert error.delta_id is None


# --- immutability ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [(VALID, "id"), (VALID, "pointers"), (Pointer("r", 1), "target"), (Reference("x"), "context")],
)
def test_frozen(value: Any, field: str) -> None:
    before = getattr(value, field)
    with pytest.raises(AttributeError):
        setattr(value, field, "changed")
    with pytest.raises(AttributeError):
        delattr(value, field)
    assert getattr(value, field) == before


@pytest.mark.parametrize("value", [VALID, Pointer("r", 1), Reference("x", "c")])
def test_slotted(value: Any) -> None:
    assert not hasattr(value, "__dict__")
    with pytest.raises(AttributeError):
        value.not_a_field = 1


@deterministic()
@given(deltas())
def test_hashable_and_equal_by_value(delta: Delta) -> None:
    copy = Delta(delta.id, delta.timestamp, delta.author, delta.system, tuple(delta.pointers))
    assert copy == delta
    assert hash(copy) == hash(delta)
    assert len({delta, copy}) == 1
    assert {delta: 1}[copy] == 1


@deterministic()
@given(pointers(), references())
def test_pointers_and_references_hashable(pointer: Pointer, reference: Reference) -> None:
    assert hash(pointer) == hash(Pointer(pointer.role, pointer.target))
    assert hash(reference) == hash(Reference(reference.id, reference.context))
    assert {pointer, Pointer(pointer.role, pointer.target)} == {pointer}


def test_different_deltas_differ() -> None:
    assert make(id="d2") != VALID
    assert make(pointers=VALID.pointers[:-1]) != VALID
    assert Reference("x") != Reference("x", "c")
    assert len({VALID, make(id="d2"), make(author="bob")}) == 3
