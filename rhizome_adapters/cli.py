"""The ``rhizome`` command: serve an instance, connect it to others, put and list deltas, demo.

Every failure the user can cause (bad arguments, an unreachable URL, a port in use, a missing
database) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sqlite3
import ssl
import sys
import uuid
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rhizome_proto import (
    DEFAULT_MAX_ID_LENGTH,
    DEFAULT_MEMORY_BUDGET,
    AdmissionLimits,
    Credentials,
    Delta,
    DeltaFilter,
    ErrorCode,
    EventType,
    FederationEvent,
    InitialSync,
    InvalidDeltaError,
    LinkConfig,
    Pointer,
    ReconnectPolicy,
    ReconnectSupervisor,
    Reference,
    SignatureTrustPolicy,
    TimestampRange,
    TrustPolicy,
    combine_trust_policies,
    create_author_trust_policy,
    create_system_trust_policy,
    generate_signing_key,
    load_signing_key,
    load_verify_key,
    parse_token_file,
    public_key_text,
    server_path,
    sign_delta,
    signing_key_pem,
)

from .aio import FederatedRhizomeDB, FederationLink
from .storage import SQLiteStore

log = logging.getLogger("rhizome")

DEFAULT_DB = "rhizome.sqlite"
TLS_CA_HELP = "wss://: trust the CA certificates in FILE (PEM) instead of the system's"


class CLIError(Exception):
    """A failure to report in one line."""


# ------------------------------------------------------------------------- helpers


def _storage_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.memory:
        return {"storage": "memory"}
    return {"storage": "sqlite", "path": args.db}


def _new_system_id() -> str:
    return f"rhizome-{uuid.uuid4().hex[:12]}"


def _system_id(args: argparse.Namespace) -> str:
    """The given id; else the one kept in the database (made once); else a fresh one."""
    if getattr(args, "system_id", None):
        return str(args.system_id)
    if args.memory or args.db is None:
        return _new_system_id()
    store = SQLiteStore(args.db)
    try:
        sid = store.get_meta("system_id")
        if sid is None:
            sid = _new_system_id()
            store.set_meta("system_id", sid)
        return sid
    finally:
        store.close()


def _check_url(url: str) -> None:
    """Refuse anything but ``ws://HOST[:PORT]/PATH`` or ``wss://...`` before connecting."""
    expected = "expected ws://HOST:PORT/PATH or wss://HOST:PORT/PATH"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError as exc:
        raise CLIError(f"invalid URL {url!r} ({exc}): {expected}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise CLIError(f"invalid URL {url!r}: {expected}")


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server's TLS context from ``--tls-cert`` and ``--tls-key`` (both or neither)."""
    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise CLIError("--tls-cert and --tls-key go together: give both or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise CLIError(
            f"cannot load the TLS certificate {args.tls_cert} and key {args.tls_key}: {exc}"
        ) from None
    return context


def _client_tls(url: str, cafile: str | None) -> ssl.SSLContext | None:
    """The TLS context for ``url``: ``None`` for ``ws://``; for ``wss://`` the system's trust
    store, or only the CA certificates in ``--tls-ca``."""
    if urlsplit(url).scheme != "wss":
        if cafile is not None:
            raise CLIError(f"--tls-ca needs a wss:// URL, not {url}")
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise CLIError(f"cannot load the TLS CA file {cafile}: {exc}") from None


def _reconnect(attempts: int, max_delay: float = 30.0) -> ReconnectPolicy:
    """``attempts`` connection attempts in a row (0: forever) as a :class:`ReconnectPolicy`,
    whose ``max_attempts`` counts the retries after the first attempt."""
    if attempts == 1:
        return ReconnectPolicy(enabled=False)
    return ReconnectPolicy(
        max_attempts=max(attempts - 1, 0),
        initial_delay=min(0.5, max_delay),
        max_delay=max_delay,
    )


async def _open_link(
    db: FederatedRhizomeDB,
    url: str,
    config: LinkConfig,
    tls: ssl.SSLContext | None = None,
    token: str | None = None,
) -> FederationLink:
    """``connect_to_remote``, with its failure as one line: why the last attempt failed, as
    the link's reconnect supervisor recorded it."""
    ended: list[ReconnectSupervisor] = []  # the supervisor of the link, once it gave up

    def on_event(event: FederationEvent) -> None:
        link = db.get_federation_link(event.link_id)
        if link is not None and link.status == "failed" and link.reconnect is not None:
            ended.append(link.reconnect)

    unsubscribe = db.on_federation_event(on_event, (EventType.LINK_ERROR,))
    try:
        return await db.connect_to_remote(url, config, ssl=tls, token=token)
    except ConnectionError as exc:
        supervisor = ended[-1] if ended else None
        what = f"cannot connect to {url}"
        raise CLIError(_link_failure(what, db.system_id, supervisor, str(exc))) from None
    finally:
        unsubscribe()


def _link_failure(
    what: str, system_id: str, supervisor: ReconnectSupervisor | None, fallback: str
) -> str:
    """One line: ``what`` failed, and why, from the link's supervisor once it gave up (else
    ``fallback``)."""
    failure = None if supervisor is None else supervisor.last_failure
    if supervisor is None or failure is None:
        return f"{what}: {fallback}"
    if failure.self_link:
        return (
            f"{what}: the remote system id {system_id!r} is our own: a link to ourselves "
            "(the same database as the server's?), not retried"
        )
    tries = f" ({supervisor.attempts} attempts)" if supervisor.attempts > 1 else ""
    why = failure.reason or failure.describe()  # the reason names the status or code
    return f"{what}{tries}: {why}" + (" (not retried)" if failure.permanent else "")


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until one of ``aws`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _token(args: argparse.Namespace) -> str | None:
    """The client's bearer token: ``--token`` or the first line of ``--token-file``."""
    if args.token is not None and args.token_file is not None:
        raise CLIError("--token and --token-file: give one of them")
    if args.token_file is None:
        token: str | None = args.token
    else:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            raise CLIError(f"cannot read --token-file {args.token_file}: {exc}") from None
    if token is not None and (not token or any(c.isspace() or not c.isprintable() for c in token)):
        raise CLIError("the token must be non-empty printable text without spaces")
    return token


def _credentials(args: argparse.Namespace) -> Credentials | None:
    """The server's accepted tokens from ``--auth-file`` (``TOKEN SYSTEM_ID ...`` per line)."""
    if args.auth_file is None:
        return None
    try:
        with open(args.auth_file, encoding="utf-8") as f:
            return parse_token_file(f.read(), args.auth_file)
    except OSError as exc:
        raise CLIError(f"cannot read --auth-file {args.auth_file}: {exc}") from None
    except ValueError as exc:
        raise CLIError(f"--auth-file: {exc}") from None


def _limits(args: argparse.Namespace) -> AdmissionLimits:
    try:
        return AdmissionLimits(
            max_pending=args.max_pending,
            pending_timeout=args.pending_timeout,
            max_links=args.max_links,
            max_links_per_address=args.max_links_per_address,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _read_key(text: str, what: str) -> bytes:
    """A key given as text, or ``@FILE`` / the path of an existing file holding it."""
    path = Path(text[1:] if text.startswith("@") else text)
    if text.startswith("@") or (len(text) < 4096 and path.is_file()):
        try:
            return path.read_bytes()
        except OSError as exc:
            raise CLIError(f"{what}: cannot read {path}: {exc.strerror}") from None
    return text.encode()


def _trust_keys(specs: Sequence[str]) -> dict[str, list[bytes]]:
    """``--trust-key SYSTEM=KEY`` (repeatable; several keys for one system all count)."""
    keys: dict[str, list[bytes]] = {}
    for spec in specs:
        system, sep, key = spec.partition("=")
        if not sep or not system or not key:
            raise CLIError(f"--trust-key {spec!r}: expected SYSTEM=KEY (KEY: text, or @FILE)")
        data = _read_key(key, f"--trust-key {system}")
        try:
            load_verify_key(data)
        except ValueError as exc:
            raise CLIError(f"--trust-key {system}: {exc}") from None
        keys.setdefault(system, []).append(data)
    return keys


def _trust(args: argparse.Namespace) -> TrustPolicy | None:
    policies: list[TrustPolicy] = []
    if args.trust_author:
        policies.append(create_author_trust_policy(args.trust_author))
    keys = _trust_keys(args.trust_key or ())
    if keys:  # systems are trusted by their signatures: each trusted system needs a key
        missing = sorted(set(args.trust_system or ()) - set(keys))
        if missing:
            raise CLIError(f"--trust-system {missing[0]}: no --trust-key for it")
        policies.append(SignatureTrustPolicy(keys))
    elif args.trust_system:
        policies.append(create_system_trust_policy(args.trust_system))
    if not policies:
        return None
    return policies[0] if len(policies) == 1 else combine_trust_policies(*policies)


def _parse_pointer(text: str) -> Pointer:
    """``role=text`` (a string target) or ``role:=JSON`` (number, boolean, or a reference
    ``{"id": ..., "context": ...}``)."""
    role, sep, raw = text.partition("=")
    if not sep or not role.rstrip(":"):
        raise CLIError(f"pointer {text!r}: write role=text or role:=JSON")
    if not role.endswith(":"):
        return Pointer(role=role, target=raw)
    role = role[:-1]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise CLIError(f"pointer {text!r}: {raw!r} is not JSON") from None
    if isinstance(value, dict):
        ref_id, context = value.get("id"), value.get("context")
        if (
            set(value) - {"id", "context"}
            or not isinstance(ref_id, str)
            or not (context is None or isinstance(context, str))
        ):
            raise CLIError(
                f'pointer {text!r}: a reference is {{"id": "...", "context": "..."}} '
                "(context optional)"
            )
        return Pointer(role=role, target=Reference(id=ref_id, context=context))
    if not isinstance(value, str | int | float | bool):
        raise CLIError(f"pointer {text!r}: a target is a string, number, boolean or reference")
    if isinstance(value, float) and not math.isfinite(value):
        raise CLIError(f"pointer {text!r}: a number must be finite")
    return Pointer(role=role, target=value)


def _filter(args: argparse.Namespace) -> DeltaFilter | None:
    rng = None
    if args.since is not None or args.until is not None:
        rng = TimestampRange(start=args.since, end=args.until)
    flt = DeltaFilter(
        ids=tuple(args.id) if args.id else None,
        authors=tuple(args.author) if args.author else None,
        systems=tuple(args.system) if args.system else None,
        target_ids=tuple(args.target_id) if args.target_id else None,
        target_contexts=tuple(args.target_context) if args.target_context else None,
        timestamp_range=rng,
        include_negated=True if args.include_negated else None,
    )
    return None if flt == DeltaFilter() else flt


def _delta_line(delta: Delta) -> str:
    parts = []
    for p in delta.pointers:
        t = p.target
        if isinstance(t, Reference):
            shown = f"@{t.id}" + (f"#{t.context}" if t.context else "")
        else:
            shown = json.dumps(t)
        parts.append(f"{p.role}={shown}")
    return f"{delta.id}  {delta.timestamp}  {delta.author}@{delta.system}  {' '.join(parts)}"


class _Progress:
    """A one-line progress bar on stderr for the initial sync."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total = 0
        self.done = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = -1  # the last percentage written as a line (not a terminal)

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        self.draw()

    def advance(self, n: int) -> None:
        self.done += n
        self.draw()

    def draw(self) -> None:
        width = 30
        frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
        bar = "#" * int(frac * width)
        line = f"syncing [{bar:<{width}}] {self.done}/{self.total}"
        if self.tty:  # one line, redrawn in place
            self.stream.write("\r" + line)
        else:  # a log: a line per percent at most, and the last one always
            percent = int(frac * 100)
            if percent == self._shown and self.done < self.total:
                return
            self._shown = percent
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _install_stop() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: the command then shuts down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if sys.platform == "win32":  # asyncio has no signal handlers there: Ctrl+C interrupts
        return stop
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


#: The event types ``_log_event`` writes at level INFO, and at level WARNING.
_INFO = (EventType.LINK_CONNECTED, EventType.LINK_DISCONNECTED, EventType.SYNC_COMPLETED)
_WARNING = (EventType.LINK_ERROR, EventType.DELTA_REJECTED)
#: The event types ``_log_event`` writes (asking for these only spares an event per delta).
_LOGGED = (*_INFO, *_WARNING)
#: The answers to a delta ``put --to`` sends.
_VERDICTS = (EventType.DELTA_SENT, EventType.DELTA_REJECTED)
#: The codes of a refused initial sync.
_SYNC_REFUSED = (ErrorCode.SYNC_ERROR, ErrorCode.SYNC_NOT_SUPPORTED)


def _log_event(event: FederationEvent) -> None:
    if event.type in _INFO:
        log.info("%s %s%s", event.type, event.link_id, f" ({event.reason})" if event.reason else "")
    elif event.type in _WARNING:
        log.warning("%s %s: %s", event.type, event.link_id, event.reason)


# ------------------------------------------------------------------------- commands


async def _serve(args: argparse.Namespace) -> int:
    tls = _server_tls(args)
    credentials, limits = _credentials(args), _limits(args)
    stop = _install_stop()  # before "listening on": a signal right after it must stop cleanly
    connection_memory = args.max_connection_memory
    async with FederatedRhizomeDB(
        system_id=_system_id(args),
        trust_policy=_trust(args),
        auto_broadcast=not args.no_broadcast,
        memory_budget=args.memory_budget * 2**20,
        max_connection_memory=connection_memory * 2**20 if connection_memory else None,
        rate_limit=args.rate_limit,
        max_id_length=args.max_id_length,
        **_storage_kwargs(args),
    ) as db:
        db.on_federation_event(_log_event, _LOGGED)
        try:
            url = await db.enable_server(
                host=args.host,
                port=args.port,
                path=args.path,
                ssl=tls,
                limits=limits,
                credentials=credentials,
            )
        except OSError as exc:  # the message names the address and the reason
            raise CLIError(exc.strerror or str(exc)) from None
        print(f"listening on {url}", flush=True)
        log.info("system id %s, %d deltas stored", db.system_id, len(db.store))
        await stop.wait()
        log.info("shutting down")
    return 0


async def _connect(args: argparse.Namespace) -> int:
    _check_url(args.url)
    tls = _client_tls(args.url, args.tls_ca)
    token = _token(args)
    initial_sync: InitialSync = args.initial_sync or (
        "full" if args.since is None else "from_timestamp"
    )
    if initial_sync == "from_timestamp" and args.since is None:
        raise CLIError("--initial-sync from_timestamp needs --since MS")
    config = LinkConfig(
        mode=args.mode,
        initial_sync=initial_sync,
        sync_from_timestamp=args.since or 0,
        reconnect=_reconnect(args.max_attempts, args.max_delay),
    )
    stop = _install_stop()
    async with FederatedRhizomeDB(
        system_id=_system_id(args), trust_policy=_trust(args), **_storage_kwargs(args)
    ) as db:
        progress = _Progress()
        synced = asyncio.Event()
        failed = asyncio.Event()  # the link gave up reconnecting, or the sync was refused
        failure = ""
        received = 0
        connected = False

        def on_event(event: FederationEvent) -> None:
            nonlocal connected, failure, received
            kind = event.type
            if kind is EventType.LINK_CONNECTED:
                connected = True
            elif kind is EventType.SYNC_COMPLETED:
                progress.finish()  # end the bar's line before the log line
            if kind in (EventType.LINK_ERROR, EventType.LINK_DISCONNECTED) and not connected:
                log.debug("%s: %s", kind, event.reason)  # summed up if connecting fails
            else:
                _log_event(event)
            if kind is EventType.SYNC_STARTED:
                progress.start(event.total or 0)
            elif kind is EventType.SYNC_PROGRESS:
                progress.advance(event.count or 0)
            elif kind is EventType.SYNC_COMPLETED:
                received = event.count or 0
                synced.set()
            elif kind is EventType.LINK_ERROR and connected:
                link = db.get_federation_link(event.link_id)
                sync_refused = event.code in _SYNC_REFUSED and not synced.is_set()
                if link is not None and link.status == "failed":
                    what = f"lost the link to {args.url}"
                    failure = _link_failure(what, db.system_id, link.reconnect, str(event.reason))
                    failed.set()
                elif sync_refused:
                    failure = event.reason or "the initial sync was refused"
                    failed.set()

        db.on_federation_event(
            on_event, (*_LOGGED, EventType.SYNC_STARTED, EventType.SYNC_PROGRESS)
        )
        opening = asyncio.ensure_future(_open_link(db, args.url, config, tls, token))
        await _first(opening, stop.wait())
        if not opening.done():  # interrupted while connecting
            await asyncio.wait({opening})
            return 130 if args.once else 0
        link = opening.result()
        log.info("connected to %s (%s)", link.remote_system_id, args.url)
        if args.once:
            if initial_sync == "none" or args.mode == "push":
                print(f"connected to {link.remote_system_id}; no initial sync requested")
                return 0
            await _first(synced.wait(), failed.wait(), stop.wait())
            if synced.is_set():
                print(f"synced {received} deltas from {link.remote_system_id}", flush=True)
                return 0
            if failed.is_set():
                raise CLIError(failure)
            return 130
        await _first(failed.wait(), stop.wait())
        if failed.is_set() and not stop.is_set():
            raise CLIError(failure)
    return 0


async def _put(args: argparse.Namespace) -> int:
    pointers = [_parse_pointer(p) for p in args.pointer]
    tls = None
    token = _token(args)
    if token is not None and not args.to:
        raise CLIError("--token goes with --to URL")
    if args.to:
        _check_url(args.to)
        tls = _client_tls(args.to, args.tls_ca)
    elif args.tls_ca is not None:
        raise CLIError("--tls-ca goes with --to wss://...")
    storage = {"storage": "memory"} if args.db is None else _storage_kwargs(args)
    async with FederatedRhizomeDB(system_id=_system_id(args), **storage) as db:
        try:
            delta = db.create_delta(
                args.author, pointers, id=args.delta_id, timestamp=args.timestamp
            )
        except InvalidDeltaError as exc:
            raise CLIError(f"invalid delta: {exc}") from None
        if args.signing_key:
            data = _read_key("@" + args.signing_key, "--signing-key")
            try:
                delta = sign_delta(delta, load_signing_key(data))
            except ValueError as exc:
                raise CLIError(f"--signing-key {args.signing_key}: {exc}") from None
        await db.persist_delta(delta)
        if args.to:
            config = LinkConfig(mode="push", initial_sync="none", reconnect=_reconnect(1))
            link = await _open_link(db, args.to, config, tls, token)
            done = asyncio.Event()
            verdict: list[FederationEvent] = []

            def on_event(event: FederationEvent) -> None:
                ours = event.delta_id == delta.id or (event.delta and event.delta.id == delta.id)
                if ours and event.type in _VERDICTS:
                    verdict.append(event)
                    done.set()

            db.on_federation_event(on_event, _VERDICTS)
            await link.send_delta(delta)
            try:
                await asyncio.wait_for(done.wait(), args.timeout)
            except TimeoutError:
                raise CLIError(f"no answer from {args.to} within {args.timeout} s") from None
            if verdict[0].type is EventType.DELTA_REJECTED:
                raise CLIError(f"rejected by {link.remote_system_id}: {verdict[0].reason}")
        print(delta.id)
    return 0


def _keygen(args: argparse.Namespace) -> int:
    """Write a new Ed25519 private key (PEM, readable by its owner only); print the public key
    (what ``--trust-key SYSTEM=KEY`` takes on the instances that trust it)."""
    key = generate_signing_key()
    pem = signing_key_pem(key)
    try:
        fd = os.open(args.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CLIError(f"{args.key_file} exists: not overwriting a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(public_key_text(key))
    return 0


def _ls(args: argparse.Namespace) -> int:
    if not Path(args.db).exists():
        raise CLIError(f"no database at {args.db}")
    store = SQLiteStore(args.db)
    try:
        if args.show:
            delta = store.get(args.show)
            if delta is None:
                raise CLIError(f"no delta {args.show!r} in {args.db}")
            print(json.dumps(_to_json(delta), indent=2))
            return 0
        flt = _filter(args)
        if args.count:
            print(store.count(flt))
            return 0
        shown, after = 0, None
        while args.limit is None or shown < args.limit:
            want = 500 if args.limit is None else min(500, args.limit - shown)
            rows = store.scan(after=after, filter=flt, limit=want)
            if not rows:
                break
            for _, delta in rows:
                print(json.dumps(_to_json(delta)) if args.json else _delta_line(delta))
            shown += len(rows)
            after = rows[-1][0]
        return 0
    finally:
        store.close()


def _to_json(delta: Delta) -> Any:
    import msgspec

    return msgspec.to_builtins(delta)


async def _demo(args: argparse.Namespace) -> int:
    print("demo: one hub and three spokes, in memory, on 127.0.0.1")
    async with FederatedRhizomeDB(system_id="hub") as hub:
        url = await hub.enable_server(host="127.0.0.1", port=0)
        print(f"hub listening on {url}")
        spokes = [FederatedRhizomeDB(system_id=f"spoke-{i + 1}") for i in range(3)]
        try:
            for spoke in spokes:
                await spoke.__aenter__()
                await spoke.connect_to_remote(url)
            for i, spoke in enumerate(spokes):
                for j in range(args.deltas):
                    delta = spoke.create_delta(
                        f"author-{i + 1}",
                        [
                            Pointer(
                                role="movie", target=Reference(id=f"movie-{j}", context="reviews")
                            ),
                            Pointer(role="rating", target=(i + j) % 5 + 1),
                        ],
                    )
                    await spoke.persist_delta(delta)
            expected = 3 * args.deltas
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while loop.time() < deadline:
                counts = [len(s.scan_deltas()) for s in spokes]
                if all(c == expected for c in counts) and len(hub.scan_deltas()) == expected:
                    break
                await asyncio.sleep(0.05)
            for db in (hub, *spokes):
                print(f"  {db.system_id:<8} holds {len(db.scan_deltas())} deltas")
            ok = all(len(db.scan_deltas()) == expected for db in (hub, *spokes))
            print("converged" if ok else "did NOT converge")
            return 0 if ok else 1
        finally:
            for spoke in spokes:
                await spoke.close()


# ------------------------------------------------------------------------- parsing


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def _ms(text: str) -> int | float:
    """Milliseconds since the epoch (an integer stays an integer)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}")
    return int(value) if value.is_integer() else value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _url_path(text: str) -> str:
    """``--path``, checked as ``enable_server`` checks it (``federation``: ``/federation``)."""
    try:
        return server_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_storage(p: argparse.ArgumentParser, default_db: str | None = DEFAULT_DB) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--db", default=default_db, help=f"SQLite file (default {DEFAULT_DB})")
    group.add_argument("--memory", action="store_true", help="keep deltas in memory only")


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-author", action="append", metavar="A", help="accept only authors A")
    p.add_argument("--trust-system", action="append", metavar="S", help="accept only systems S")
    p.add_argument(
        "--trust-key",
        action="append",
        metavar="S=KEY",
        help="accept system S's deltas only signed by KEY (public key text or @FILE)",
    )


def _add_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="bearer token for the server (visible in the process list)")
    p.add_argument("--token-file", metavar="FILE", help="bearer token: the first line of FILE")


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
    return value


def _rate(text: str) -> tuple[float, float]:
    """``RATE`` or ``RATE,BURST`` (BURST defaults to RATE)."""
    rate_text, _, burst_text = text.partition(",")
    try:
        rate = float(rate_text)
        burst = float(burst_text) if burst_text else rate
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE or RATE,BURST, not {text!r}") from None
    if not (math.isfinite(rate) and math.isfinite(burst) and rate > 0 and burst >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive RATE and a BURST >= 1: {text!r}")
    return rate, burst


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rhizome", description="RhizomeDB federation: serve, connect, put, ls, keygen, demo."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run a federation server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080, help="0 picks a free port")
    p.add_argument("--path", type=_url_path, default="/federation", help="URL path served")
    _add_storage(p)
    p.add_argument("--system-id", help="this instance's id (default: kept in the database)")
    _add_trust(p)
    p.add_argument("--no-broadcast", action="store_true", help="do not relay between links")
    p.add_argument("--tls-cert", metavar="FILE", help="serve wss://: certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="serve wss://: private key (PEM)")
    p.add_argument(
        "--auth-file",
        metavar="FILE",
        help="accept only clients with a token of FILE: 'TOKEN SYSTEM_ID [SYSTEM_ID ...]' per "
        "line ('*': any system id); a client may say hello only as one of its token's ids",
    )
    defaults = AdmissionLimits()
    p.add_argument(
        "--max-links",
        type=_positive,
        default=defaults.max_links,
        metavar="N",
        help="open links in all (default: %(default)s)",
    )
    p.add_argument(
        "--max-links-per-address",
        type=_positive,
        default=defaults.max_links_per_address,
        metavar="N",
        help="open links from one client address (default: %(default)s)",
    )
    p.add_argument(
        "--max-pending",
        type=_positive,
        default=defaults.max_pending,
        metavar="N",
        help="connections still in their upgrade at once, the oldest closed for a new one "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--pending-timeout",
        type=_seconds,
        default=defaults.pending_timeout,
        metavar="S",
        help="seconds a connection may take to complete its upgrade (default: %(default)s)",
    )
    p.add_argument(
        "--memory-budget",
        type=_positive,
        default=DEFAULT_MEMORY_BUDGET // 2**20,
        metavar="MIB",
        help="MiB held for peers in all: queued output, parked deltas (default: %(default)s)",
    )
    p.add_argument(
        "--max-connection-memory",
        type=_positive,
        metavar="MIB",
        help="MiB queued for one connection before its peer is dropped for not reading "
        "(default: 16, or twice the largest message)",
    )
    p.add_argument(
        "--rate-limit",
        type=_rate,
        metavar="RATE[,BURST]",
        help="hold each client to RATE messages or deltas a second, bursts of BURST "
        "(default: no limit)",
    )
    p.add_argument(
        "--max-id-length",
        type=_positive,
        default=DEFAULT_MAX_ID_LENGTH,
        metavar="N",
        help="longest id, author or system id accepted, in characters (default: %(default)s)",
    )

    p = sub.add_parser("connect", help="connect to a federation server and sync")
    p.add_argument("url", help="ws://HOST:PORT/PATH or wss://HOST:PORT/PATH")
    _add_storage(p)
    p.add_argument("--system-id")
    p.add_argument("--mode", choices=["bidirectional", "push", "pull"], default="bidirectional")
    p.add_argument(
        "--initial-sync",
        choices=["full", "from_timestamp", "none"],
        help="what to sync first (default: full, or from_timestamp with --since)",
    )
    p.add_argument("--since", type=_ms, metavar="MS", help="sync deltas from MS on")
    p.add_argument("--once", action="store_true", help="exit after the initial sync")
    p.add_argument(
        "--max-attempts", type=_count, default=5, help="connect attempts in a row, 0 = forever"
    )
    p.add_argument("--max-delay", type=_seconds, default=30.0, help="longest retry delay, seconds")
    p.add_argument("--tls-ca", metavar="FILE", help=TLS_CA_HELP)
    _add_token(p)
    _add_trust(p)

    p = sub.add_parser("put", help="author a delta into a database, or send it to a URL")
    p.add_argument("pointer", nargs="+", help="role=text, or role:=JSON (number, bool, reference)")
    p.add_argument("--author", required=True)
    p.add_argument("--id", dest="delta_id", help="delta id (default: a new UUID)")
    p.add_argument("--timestamp", type=int, help="milliseconds since the epoch (default: now)")
    _add_storage(p, default_db=None)
    p.add_argument("--system-id")
    p.add_argument("--to", metavar="URL", help="send the delta to this federation server")
    p.add_argument("--signing-key", metavar="FILE", help="sign the delta with this key")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait for the ack")
    p.add_argument("--tls-ca", metavar="FILE", help=TLS_CA_HELP)
    _add_token(p)

    p = sub.add_parser("ls", help="list, count or show the deltas of a database")
    p.add_argument("--db", default=DEFAULT_DB)
    p.add_argument("--count", action="store_true", help="print only how many match")
    p.add_argument("--show", metavar="ID", help="print one delta as JSON")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--limit", type=int)
    p.add_argument("--id", action="append", metavar="ID")
    p.add_argument("--author", action="append", metavar="A")
    p.add_argument("--system", action="append", metavar="S")
    p.add_argument("--target-id", action="append", metavar="T")
    p.add_argument("--target-context", action="append", metavar="C")
    p.add_argument("--since", type=_ms, metavar="MS")
    p.add_argument("--until", type=_ms, metavar="MS")
    p.add_argument("--include-negated", action="store_true")

    p = sub.add_parser("keygen", help="write a new signing key; print its public key")
    p.add_argument("key_file", help="where to write the private key (PEM); must not exist")

    p = sub.add_parser("demo", help="a hub and three spokes converge on screen")
    p.add_argument("--deltas", type=int, default=5, help="deltas authored by each spoke")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "put" and args.db is None and not args.memory and not args.to:
        args.db = DEFAULT_DB
    try:
        if args.command == "ls":
            return _ls(args)
        if args.command == "keygen":
            return _keygen(args)
        runner = {"serve": _serve, "connect": _connect, "put": _put, "demo": _demo}[args.command]
        return asyncio.run(runner(args))
    except CLIError as exc:
        print(f"rhizome: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except sqlite3.Error as exc:
        print(f"rhizome: error: database {getattr(args, 'db', None)}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, InvalidDeltaError) as exc:
        print(f"rhizome: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
