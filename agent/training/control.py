"""The child's side of the parent link: messages out over a pipe, stop requests in on stdin.

Imported only by the child. Trainers call `check()` at every safe point; it raises StopRequested
once the parent asked to stop (a "stop" line, stdin closed, or SIGTERM).

A batch of a big model can take seconds, so safe points at batch ends are not enough. While a
trainer marks its code `interruptible` (the training steps of an epoch: nothing there writes a
file the run keeps), a stop request also sends STOP_SIGNAL to the main thread, whose handler
raises StopRequested at once: Python runs it between two tensor operations.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType

from agent.domain.messages import TrainerMessage, encode

STOP_COMMAND = "stop"
STOP_SIGNAL = signal.SIGUSR1
# After SIGTERM the child gets this long to report Stopped before it exits hard.
SIGTERM_EXIT_AFTER = 1.0
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class StopRequested(BaseException):
    """Raised inside the trainer to abort at once."""

    # A BaseException, like KeyboardInterrupt, so that library code catching Exception cannot swallow it.


class Control:
    """Stop flag, message sender and last completed epoch, shared by the child's trainers."""

    def __init__(self, message_fd: int) -> None:
        self._fd = message_fd
        self._lock = threading.Lock()
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.last_epoch: int | None = None  # last completed epoch (1-based)
        self._finishing = False
        self._parent_gone = False
        self._sending = False
        self._interruptible = False
        self._main_thread: int | None = None

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    @property
    def interruptible(self) -> bool:
        return self._interruptible

    @interruptible.setter
    def interruptible(self, value: bool) -> None:
        """Mark whether a stop may abort the main thread anywhere (set and cleared by the main thread)."""
        self._interruptible = value
        if value:
            self.check()  # a stop that came while it was off

    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()
        main = self._main_thread
        if self._interruptible and main is not None and threading.get_ident() != main:
            # Wakes the main thread even from a blocking call; the handler decides whether to raise.
            signal.pthread_kill(main, STOP_SIGNAL)

    def check(self) -> None:
        """Raise StopRequested when a stop was requested."""
        if self.stop_event.is_set() and not self._finishing:
            raise StopRequested(self.stop_reason)

    def finishing(self) -> None:
        """Enter the exit path: from now on nothing raises StopRequested."""
        self._finishing = True

    def send(self, msg: TrainerMessage) -> None:
        """Write one message line; a vanished parent turns into a stop request."""
        if self._parent_gone:
            return
        data = encode(msg)
        with self._lock:
            # A message cut in half by the stop signal would garble the next one (Stopped).
            self._sending = True
            try:
                while data:
                    written = os.write(self._fd, data)
                    data = data[written:]
            except OSError:
                self._parent_gone = True
                self.request_stop("parent closed the message pipe")
            finally:
                self._sending = False
        if self._interruptible:
            self.check()

    def start(self) -> None:
        """Start the stdin watcher and install the SIGTERM handler (main thread only)."""
        self._main_thread = threading.get_ident()
        signal.signal(STOP_SIGNAL, self._on_stop_signal)
        threading.Thread(target=self._watch_stdin, name="stdin-watch", daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _watch_stdin(self) -> None:
        # Raw reads on fd 0: a daemon thread blocked in sys.stdin's buffered reader holds its lock
        # and aborts the interpreter's shutdown.
        pending = b""
        while chunk := _read(0):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if any(line.strip() == STOP_COMMAND.encode() for line in lines):
                self.request_stop("stop requested by the parent")
        # EOF: the parent is gone or gave up on us; an orphaned training is of no use to anyone.
        self.request_stop("stdin closed")

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._interruptible and not self._sending:
            self.check()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop("SIGTERM")
        threading.Thread(target=_exit_soon, name="sigterm-exit", daemon=True).start()
        self.check()


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""


def _exit_soon() -> None:
    time.sleep(SIGTERM_EXIT_AFTER)
    print(f"still running {SIGTERM_EXIT_AFTER}s after SIGTERM, exiting", file=sys.stderr, flush=True)
    os._exit(SIGTERM_EXIT_CODE)
