"""Bearer tokens: where a client presents one, and what it lets it claim."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rhizome_proto._auth import (
    SUBPROTOCOL,
    Credentials,
    Principal,
    parse_token_file,
    token_from_request,
)

CREDS = Credentials({"tok-a": ["spoke1", "spoke2"], "tok-admin": ["*"]})


def test_tokens_map_to_the_system_ids_they_may_claim() -> None:
    spoke = CREDS.authenticate("tok-a")
    assert spoke == Principal("spoke1,spoke2", frozenset({"spoke1", "spoke2"}))
    assert spoke.allows("spoke1") and not spoke.allows("hub")
    admin = CREDS.authenticate("tok-admin")
    assert admin is not None and admin.system_ids is None and admin.allows("anything")
    for bad in (None, "", "tok-b", "tok-a ", "TOK-A"):
        assert CREDS.authenticate(bad) is None
    assert len(CREDS) == 2
    named = Credentials({"t": ["s"]}, names={"t": "alice"})
    assert named.authenticate("t") == Principal("alice", frozenset({"s"}))


def test_bad_credentials_are_refused() -> None:
    for tokens in ({"": ["s"]}, {"a b": ["s"]}, {"t": []}):
        with pytest.raises(ValueError):
            Credentials(tokens)


@pytest.mark.parametrize(
    ("headers", "target", "expected"),
    [
        ([(b"Authorization", b"Bearer tok-a")], "/federation", ("tok-a", False)),
        ([(b"authorization", b"bearer   tok-a ")], "/federation", ("tok-a", False)),
        (
            [(b"Sec-WebSocket-Protocol", b"rhizome-federation, rhizome.bearer.tok-a")],
            "/federation",
            ("tok-a", True),
        ),
        ([], "/federation?x=1&access_token=tok-a", ("tok-a", False)),
        ([], b"/federation?access_token=tok%2Da", ("tok-a", False)),
        ([(b"Authorization", b"Basic dXNlcjpwYXNz")], "/federation", (None, False)),
        (
            [(b"Sec-WebSocket-Protocol", b"rhizome.bearer.")],
            "/federation?access_token=",
            (None, False),
        ),
        ([], "/federation", (None, False)),
    ],
)
def test_where_the_token_is_found(
    headers: list[tuple[bytes, bytes]], target: str | bytes, expected: tuple[str | None, bool]
) -> None:
    assert token_from_request(headers, target) == expected


def test_the_header_wins_over_the_subprotocol_and_the_query() -> None:
    headers = [
        (b"Sec-WebSocket-Protocol", b"rhizome.bearer.from-protocol"),
        (b"Authorization", b"Bearer from-header"),
    ]
    assert token_from_request(headers, "/f?access_token=from-query") == ("from-header", False)
    assert SUBPROTOCOL == "rhizome-federation"


def test_token_file() -> None:
    creds = parse_token_file("# tokens\n\ntok-a spoke1 spoke2  # two spokes\ntok-x *\n")
    assert creds.authenticate("tok-a") == CREDS.authenticate("tok-a")
    assert creds.authenticate("tok-x") is not None
    for text, message in [
        ("tok-a\n", "tokens.txt:1: expected TOKEN SYSTEM_ID"),
        ("t a\nt b\n", "tokens.txt:2: the same token twice"),
        ("# nothing\n", "tokens.txt: no tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_token_file(text, "tokens.txt")


@given(st.text(min_size=1).filter(lambda t: not any(c.isspace() for c in t)))
def test_any_token_authenticates_only_itself(token: str) -> None:
    creds = Credentials({token: ["s"]})
    assert creds.authenticate(token) is not None
    assert creds.authenticate(token + "x") is None
