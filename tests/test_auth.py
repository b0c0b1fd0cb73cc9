"""Bearer tokens: where a client presents one, and what it lets it claim."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.events import AcceptConnection

from rhizome_proto import (
    Closed,
    ErrorCode,
    ErrorReceived,
    FederationConnection,
    HandshakeComplete,
)
from rhizome_proto._auth import (
    SUBPROTOCOL,
    Credentials,
    Principal,
    parse_token_file,
    token_from_request,
)
from tests.harness import ConnectionPair, RawClient, make_client, make_server

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


# --- over wsproto: the server's upgrade and hello checks ---------------------------------


def _server(**options: object) -> FederationConnection:
    server = make_server(credentials=CREDS, **options)
    server.start(0.0)
    return server


def test_a_client_with_a_token_federates_as_a_system_its_token_allows() -> None:
    pair = ConnectionPair(
        client_options={"token": "tok-a", "system_id": "spoke1"},
        server_options={"credentials": CREDS},
    )
    pair.transfer()
    assert pair.client.is_open and pair.server.is_open
    assert pair.server.principal == CREDS.authenticate("tok-a")
    assert pair.server.remote_system_id == "spoke1"


def test_no_token_or_a_wrong_one_gets_401() -> None:
    for options in ({}, {"token": "tok-wrong"}):
        pair = ConnectionPair(
            client_options=options | {"system_id": "spoke1"},
            server_options={"credentials": CREDS},
        )
        pair.transfer()
        answer = bytes(pair.received["client"])
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert b'www-authenticate: Bearer realm="rhizome-federation"' in answer
        (closed,) = pair.client_events
        assert isinstance(closed, Closed) and closed.code == 1006 and "401" in closed.reason
        (closed,) = pair.server_events
        assert isinstance(closed, Closed) and "bearer token" in closed.reason
        assert pair.server.principal is None and not pair.server.is_open


def test_a_token_cannot_claim_another_system_id() -> None:
    """The attack of finding 4: a client says hello with another instance's system id."""
    pair = ConnectionPair(
        client_options={"token": "tok-a", "system_id": "hub-2"},
        server_options={"credentials": CREDS},
    )
    pair.transfer()
    (error,) = pair.errors["server"]
    assert error.code is ErrorCode.UNAUTHORIZED
    refusals = [e for e in pair.client_events if isinstance(e, ErrorReceived)]
    assert [r.code for r in refusals] == [ErrorCode.UNAUTHORIZED] and refusals[0].fatal
    assert pair.server.closed and pair.server.close_code == 1008
    assert not any(isinstance(e, HandshakeComplete) for e in pair.server_events)


def test_browser_forms_of_the_token_subprotocol_and_query() -> None:
    server = _server()
    raw = RawClient()
    events = raw.connect(server, subprotocols=["rhizome-federation", "rhizome.bearer.tok-a"])
    (accept,) = [e for e in events if isinstance(e, AcceptConnection)]
    assert accept.subprotocol == "rhizome-federation"  # selected; the token is not echoed
    assert server.principal is not None and server.principal.allows("spoke2")

    server = _server()  # offered only the token: that is what can be selected
    events = RawClient().connect(server, subprotocols=["rhizome.bearer.tok-a"])
    (accept,) = [e for e in events if isinstance(e, AcceptConnection)]
    assert accept.subprotocol == "rhizome.bearer.tok-a"

    server = _server()
    raw = RawClient()
    raw.connect(server, target="/federation?access_token=tok-admin")
    assert server.principal is not None and server.principal.system_ids is None
    server.receive_data(raw.hello("anyone"), 0.1)
    assert server.is_open and server.remote_system_id == "anyone"


def test_a_bad_token_argument_is_refused() -> None:
    for bad in ("", "a b", "tok\n"):
        with pytest.raises(ValueError, match="token"):
            make_client(token=bad)
