"""Stopping without dropping work: on SIGTERM (or SIGINT) the server drains, the way a load
balancer in front of it expects.

uvicorn's own shutdown closes the listening socket at once (new clients are refused, not told)
and then cuts requests still running after its grace period. Here the first signal only marks
the server as draining: it keeps listening, answers every new ``/v1`` request 503 with
``Retry-After`` and ``Connection: close`` (and ``/health`` 503 ``"draining"``, so a balancer's
health check takes it out of rotation), and lets the requests in flight finish. When none is
left, or ``drain_timeout_s`` has passed, uvicorn is told to exit; the process then exits 0. A
second signal exits at once.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Optional

import uvicorn

from megatron_srp.serving.gate import DrainState

log = logging.getLogger("megatron_srp.serving")


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose exit signals drain first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: DrainState,
                 drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self.cut = 0  # requests still in flight when the grace period ended

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        # Not uvicorn's handler: that one re-raises the signal after shutdown, and the process
        # would end killed by SIGTERM rather than exit 0.
        if self.drain.draining:
            self.should_exit = self.force_exit = True
            return
        self.drain.draining = True
        print(f"{signal.Signals(sig).name}: draining {self.drain.in_flight} request(s) in "
              f"flight (at most {self.drain_timeout_s:g} s)", flush=True)
        threading.Thread(target=self._wait, name="srp-drain", daemon=True).start()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.drain.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.cut = self.drain.in_flight
        if self.cut:
            print(f"drain timeout: {self.cut} request(s) still in flight are cut", flush=True)
        self.should_exit = True
