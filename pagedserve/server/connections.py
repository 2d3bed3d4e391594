"""Connections that send too little: what uvicorn does not bound itself.

uvicorn closes a connection idle between requests (timeout_keep_alive) but sets no deadline
on receiving a request, so a client that connects and sends nothing, part of its headers, or
part of its body holds a file descriptor forever. RequestDeadline (mixed into uvicorn's own
HTTP/1.1 protocol class) bounds that:

- headers: a request's headers must all arrive within `timeout` of its first byte (of the
  connection's opening, for the first request); past it the connection is closed;
- body: it may pause no longer than `timeout` between reads (nginx's client_body_timeout), and
  it must keep an average of MIN_BODY_RATE bytes a second: each MIN_BODY_RATE bytes received buy
  one more second past `timeout` from the body's start (Apache mod_reqtimeout's MinRate), so a
  body trickled a byte at a time, never quite stalling, cannot hold the connection for ever;
  past either the request is answered 408 (in the route family's error body) and the connection
  closed. Time the server itself stopped reading (flow control) does not count.

Once a request has arrived whole the deadline is off: generating the response takes as long
as it takes. At the process's open-file limit asyncio's accept loop reports EMFILE, and
schedules a retry, up to `backlog` (2048) times per wake-up: thousands of tracebacks and
pending callbacks a second. Listener ends such a wake-up at its first EMFILE (one report and
one retry a second, as asyncio means it), AcceptErrorLog logs one line per
ACCEPT_ERROR_LOG_INTERVAL_S, and raise_open_file_limit() puts the limit at the hard one at
start-up, as servers commonly do."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from pagedserve.server.errors import RequestTimeoutError
from pagedserve.server.middleware import send_error

logger = logging.getLogger(__name__)

ACCEPT_ERROR_LOG_INTERVAL_S = 10.0
MIN_BODY_RATE = 500   # bytes a second a request body must average (Apache mod_reqtimeout's default MinRate)
_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_open_file_limit() -> None:
    """The soft RLIMIT_NOFILE raised to the hard limit: every open connection holds a descriptor."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard   # macOS refuses an unlimited soft limit
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            logger.debug("open-file limit raised from %d to %d", soft, wanted)
    except (ImportError, ValueError, OSError) as exc:   # no resource module (Windows), or refused
        logger.debug("open-file limit left as it is: %s", exc)


class Listener(socket.socket):
    """The listening socket. After an accept() that ran out of descriptors, the next one (the
    same wake-up of asyncio's accept loop, which goes on calling it) raises BlockingIOError,
    "nothing to accept", which ends that loop; the retry asyncio scheduled tries again."""

    _refusing = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self._refusing:
            self._refusing = False
            raise BlockingIOError(errno.EAGAIN, "accept paused: out of file descriptors")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in _ACCEPT_ERRNOS:
                self._refusing = True
            raise


class RequestDeadline(asyncio.Protocol):
    """The deadline on receiving a request, over uvicorn's HTTP/1.1 protocol (h11 or httptools:
    it reads only their common state: `cycle`, `transport`, `flow`, `loop`)."""

    request_read_timeout = 0.0   # seconds (serve's --timeout-request-read); 0: no deadline
    cycle: Any
    transport: asyncio.Transport
    flow: Any
    loop: asyncio.AbstractEventLoop
    _deadline: asyncio.TimerHandle | None = None
    _waiting_for: tuple[str, Any] | None = None   # ("headers", the previous cycle) or ("body", its cycle)
    _since = 0.0   # when that wait began, or the body last made progress
    _body_start = 0.0   # when the body's wait began (or the server last paused reading it)
    _body_bytes = 0     # bytes received since then
    _answering: asyncio.Task | None = None   # the 408 on its way

    def connection_made(self, transport: asyncio.Transport) -> None:   # type: ignore[override]
        super().connection_made(transport)   # type: ignore[safe-super]
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)   # type: ignore[misc]
        self._watch(len(data))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)   # type: ignore[safe-super]

    def _phase(self) -> tuple[str, Any] | None:
        """What the connection waits to receive: None once a request is whole (its response,
        then uvicorn's keep-alive timeout, take over)."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return ("headers", cycle)   # the next request's (a connection between requests that has
        if cycle.more_body:             # received nothing yet is uvicorn's keep-alive timeout's)
            return ("body", cycle)
        return None

    def _watch(self, received: int = 0) -> None:
        """After `received` bytes arrived (or the connection opened): start, move or stop the deadline."""
        if self.request_read_timeout <= 0 or self.transport.is_closing():
            return
        phase = self._phase()
        if phase is None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._waiting_for = None
            return
        if phase != self._waiting_for or phase[0] == "body":   # a new wait, or the body's progress
            if phase != self._waiting_for:
                self._body_start, self._body_bytes = self.loop.time(), 0
            self._waiting_for, self._since = phase, self.loop.time()
            self._body_bytes += received
        if self._deadline is None:
            self._deadline = self.loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        """When the wait ends: `timeout` after the last progress, and for a body also when its bytes
        fall behind MIN_BODY_RATE (one second more for each MIN_BODY_RATE bytes)."""
        due = self._since + self.request_read_timeout
        if self._waiting_for is not None and self._waiting_for[0] == "body":
            due = min(due, self._body_start + self.request_read_timeout + self._body_bytes / MIN_BODY_RATE)
        return due

    def _check(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:   # closed, or upgraded
            return
        phase = self._phase()
        if phase is None:
            return
        now = self.loop.time()
        if phase != self._waiting_for or (phase[0] == "body" and self.flow.read_paused):
            # a new wait, or the server is not reading: the clocks start again
            self._waiting_for, self._since, self._body_start, self._body_bytes = phase, now, now, 0
        if now < self._due():
            self._deadline = self.loop.call_at(self._due(), self._check)
            return
        cycle = phase[1]
        if phase[0] == "body" and not cycle.response_started:
            self._answering = self.loop.create_task(self._answer_timeout(cycle))
        else:
            logger.debug("closing a connection: no complete request headers within %.1f s",
                         self.request_read_timeout)
            self.transport.close()

    async def _answer_timeout(self, cycle: Any) -> None:
        """408 through the cycle's own ASGI send, then the route (waiting for the body) sees a
        disconnect and its answer goes nowhere."""
        if (self._phase() != ("body", cycle) or cycle.response_started or self.transport.is_closing()
                or self.loop.time() < self._due()):
            return   # since the check: the body arrived (or moved on: the deadline is re-armed), or it closed
        now = self.loop.time()
        if now >= self._since + self.request_read_timeout:
            logger.debug("closing a connection: a request body stalled for %.1f s", self.request_read_timeout)
            error = RequestTimeoutError(
                f"the request body stalled: nothing arrived for {self.request_read_timeout:g} s")
        else:
            logger.debug("closing a connection: a request body slower than %d bytes/s", MIN_BODY_RATE)
            error = RequestTimeoutError(
                f"the request body arrived too slowly: {self._body_bytes} bytes in {now - self._body_start:.1f} s "
                f"(at least {MIN_BODY_RATE} bytes a second are needed past the first {self.request_read_timeout:g} s)")
        try:
            await send_error(cycle.send, cycle.scope["path"], error, [(b"connection", b"close")])
        except Exception as exc:   # the connection broke meanwhile
            logger.debug("could not answer 408: %r", exc)
        finally:
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.close()


def request_deadline_protocol(timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class (httptools if installed, else h11) under RequestDeadline;
    `timeout` 0: no deadline."""
    return type("DeadlineHTTPProtocol", (RequestDeadline, AutoHTTPProtocol), {"request_read_timeout": timeout})


class AcceptErrorLog:
    """The loop's exception handler: asyncio's "socket.accept() out of system resource" (EMFILE
    and the like) logged once per `interval` seconds with a count, without a traceback; every
    other context goes to the handler that was there before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = ACCEPT_ERROR_LOG_INTERVAL_S) -> None:
        self.previous = loop.get_exception_handler()
        self.interval = interval
        self.suppressed = 0
        self.next_log = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS
                and str(context.get("message", "")).startswith("socket.accept()")):
            self.suppressed += 1
            now = loop.time()
            if now >= self.next_log:
                logger.error("cannot accept connections: %s (%d failed accepts since the last such line; "
                             "logged at most every %g s)", exc, self.suppressed, self.interval)
                self.suppressed, self.next_log = 0, now + self.interval
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


class Server(uvicorn.Server):
    """uvicorn's server with AcceptErrorLog on its event loop."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(AcceptErrorLog(loop))
        await super().startup(sockets=sockets)
