"""A misbehaving trainer child for supervisor tests, started in place of agent.training.child.

STUB_CHILD_MODE picks the misbehaviour; STUB_CHILD_PIDS names a file that receives the pid of
every helper process it starts, so tests can check (and clean up) those processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from agent.domain.messages import Done, Started, Stopped, encode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    fd = args.fd
    mode = os.environ["STUB_CHILD_MODE"]
    pid_file = os.environ.get("STUB_CHILD_PIDS", "")

    def send(data: bytes) -> None:
        os.write(fd, data)

    def record(pid: int) -> None:
        with open(pid_file, "a") as f:
            f.write(f"{pid}\n")

    if mode == "ignore-stop":
        # Never reads stdin; SIGTERM keeps its default action.
        send(encode(Started(total_epochs=1)))
        forever()
    elif mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        send(encode(Started(total_epochs=1)))
        forever()
    elif mode == "fork-exit":
        # Like a dataloader worker: a forked helper that holds the message pipe, left behind.
        record(fork_sleeper())
        send(encode(Started(total_epochs=1)))
        os._exit(0)
    elif mode == "fork-stop":
        record(fork_sleeper())
        send(encode(Started(total_epochs=1)))
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        send(encode(Stopped(epoch=None)))
        os._exit(0)
    elif mode == "escape":
        # A helper in its own session keeps the pipe open: the supervisor must not wait on it forever.
        helper = subprocess.Popen(
            [sys.executable, "-c", "import signal; signal.pause()"], pass_fds=(fd,), start_new_session=True
        )
        record(helper.pid)
        send(encode(Started(total_epochs=1)))
        os._exit(0)
    elif mode == "garbage":
        send(b"this is not json\n")
        send(b'{"type": "no-such-message"}\n')
        send(b"\n")
        send(encode(Started(total_epochs=2)))
        send(b'{"type": "batch", "epoch": 1}\n')  # missing fields
        send(b"[1, 2, 3]\n")
        send(encode(Done(save_dir="/nowhere", metrics={"metrics/mAP50(B)": 0.5})))
        os._exit(0)
    else:
        raise SystemExit(f"unknown STUB_CHILD_MODE {mode!r}")


def fork_sleeper() -> int:
    pid = os.fork()
    if pid == 0:
        try:
            forever()
        finally:
            os._exit(0)
    return pid


def forever() -> None:
    threading.Event().wait()


if __name__ == "__main__":
    main()
