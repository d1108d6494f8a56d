"""How the server's processes start and stop together.

LitServe runs a main process, a manager, one HTTP (uvicorn) process and a model worker per
device slot. Left alone, SIGTERM kills only the main (the others keep the port), SIGINT
drops the requests in flight, and a killed main leaves the others running as orphans; the
port also stays closed until the model has loaded, so a load balancer sees a refused
connection instead of ``/health``'s 503. This module fixes those four things.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import litserve as ls
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# The HTTP processes get this long to answer the requests in flight before they are killed.
DRAIN_S = 8.0
# How often an orphaned child notices that the main process has gone.
PARENT_POLL_S = 0.5
# Set in the main process once a signal has started the shutdown.
DRAINING = threading.Event()


class ClassifierServer(ls.LitServer):
    """A LitServer whose port opens while the model workers load (``/health`` answers 503
    until they are ready), and which stops with exit status 1 when a worker fails to load."""

    worker_failed = False

    def verify_worker_status(self) -> None:
        # LitServe waits here for the workers before it opens the port; wait beside it.
        def watch() -> None:
            try:
                super(ClassifierServer, self).verify_worker_status()
            except RuntimeError as err:
                log.error("%s", err)
                self.worker_failed = True
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True, name="worker-setup-watch").start()


def stop_together() -> None:
    """In the main process: on SIGTERM or SIGINT, the HTTP processes stop taking
    connections and answer the requests in flight (the model workers are still there),
    then LitServe stops the rest. A second signal kills every process at once."""

    def kill_now(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(128 + signum)

    def drain(signum: int, frame: Any) -> None:
        DRAINING.set()
        signal.signal(signal.SIGTERM, kill_now)
        signal.signal(signal.SIGINT, kill_now)
        log.info("%s: answering the requests in flight, then stopping",
                 signal.Signals(signum).name)  # fmt: skip
        http = [c for c in multiprocessing.active_children() if c.name.startswith("LitServer")]
        for child in http:
            child.terminate()  # uvicorn's graceful shutdown
        deadline = time.monotonic() + DRAIN_S
        for child in http:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
        raise KeyboardInterrupt  # LitServe's own shutdown of the workers and the manager

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    os.register_at_fork(after_in_child=_forked_child)
    logging.getLogger("litserve.server").addFilter(quiet_shutdown)


def quiet_shutdown(record: logging.LogRecord) -> bool:
    """Whether LitServe's log record says something a user stopping the server should see:
    not its warning of each HTTP process that stopped before it came to stop it, nor what
    its worker monitor thread, still polling, logs once the shutdown has ended the workers
    or the manager (a dead worker, a BrokenPipeError as a crash)."""
    message = record.getMessage()
    if "Already not alive" in message:
        return False
    monitor = message.startswith("Monitoring worker crashed") or "died; shutting down" in message
    return not (DRAINING.is_set() and monitor)


def _forked_child() -> None:
    # The manager and the HTTP processes are forked: they take the default signal
    # handlers back (uvicorn re-raises the signal it stopped on) and must not outlive
    # a killed main.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    exit_with_parent()


def exit_with_parent() -> None:
    """In a child process: exit once the parent has gone (a SIGKILLed main cannot stop its
    children, and an orphan would keep the port or a core)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2.0)  # uvicorn's graceful shutdown has no worker to wait for
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all
    arrived within ``header_timeout`` seconds (uvicorn itself waits for them forever)."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _timed_out(self) -> None:
        self.header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()  # the next request of a kept-alive connection
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
