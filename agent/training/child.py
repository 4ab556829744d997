"""Entry point of the trainer child: `python -m agent.training.child --job FILE --fd N`.

Started by the parent (training/parent.py) in its own process group. Messages go to fd N as JSON lines;
stdin carries commands ("stop"). Exit codes: 0 done or stopped, 1 error, others a crash.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn, assert_never

from agent.domain.messages import Error, Stopped
from agent.training.control import Control, StopRequested
from agent.training.jobfile import ChildJob, read_job

_MAX_ERROR_CHARS = 2000
# Diagnostic switch: a file to append every attempted name lookup and socket connection to, one
# line each (tests use it to prove that an offline training makes none).
AUDIT_SOCKETS_ENV = "SATURNOS_AUDIT_SOCKETS"
# Diagnostic switch: make every training batch of an ultralytics run last at least this many seconds
# of real tensor work (benchmarks and tests of a stop within a slow batch, without a big model).
SLOW_BATCH_ENV = "SATURNOS_SLOW_BATCH_SECONDS"
_AUDITED = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "subprocess.Popen")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.training.child")
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)

    _audit_sockets(os.environ.get(AUDIT_SOCKETS_ENV))
    # Our own subprocesses (ultralytics spawns a few) must not hold the parent's message pipe open.
    os.set_inheritable(args.fd, False)
    control = Control(args.fd)
    control.start()
    try:
        child = read_job(args.job)
        # Relative paths and downloads (ultralytics saves fetched weights in the cwd) stay in the run.
        os.chdir(child.job.workspace)
        _run(child, control)
    except StopRequested:
        control.finishing()
        print(f"stopped: {control.stop_reason}", file=sys.stderr, flush=True)
        control.send(Stopped(epoch=control.last_epoch))
        _exit_now(0)
    except Exception as exc:
        control.finishing()
        traceback.print_exc()
        control.send(Error(message=_describe(exc)))
        _exit_now(1)
    control.finishing()
    return 0


def _run(child: ChildJob, control: Control) -> None:
    trainer = child.job.request.trainer
    if trainer == "fake":
        from agent.training.fake import run_fake

        run_fake(child.job, control)
    elif trainer == "ultralytics":
        from agent.training.yolo import run_yolo

        run_yolo(child.job, control, offline=child.offline or _env_offline(), slow_batch=_slow_batch())
    else:
        assert_never(trainer)


def _env_offline() -> bool:
    flags = (os.environ.get(k, "").strip().lower() for k in ("SATURNOS_OFFLINE", "YOLO_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def _slow_batch() -> float:
    try:
        return max(0.0, float(os.environ.get(SLOW_BATCH_ENV, "0") or 0))
    except ValueError:
        return 0.0


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def _exit_now(code: int) -> NoReturn:
    """Exit without waiting for library threads or atexit hooks: a stop must be quick."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _audit_sockets(path: str | None) -> None:
    if not path:
        return

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event in _AUDITED:
            detail = args[1] if event in ("socket.connect", "subprocess.Popen") and len(args) > 1 else args
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {event} {detail!r}\n")

    sys.addaudithook(hook)


if __name__ == "__main__":
    sys.exit(main())
