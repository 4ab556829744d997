"""Parent side of the trainer child: spawn, read its messages, stop it, reap its whole group.

The child runs `python -m agent.training.child` in its own session (hence its own process
group), with stdout and stderr appended to `workspace/child.log`, messages on a dedicated pipe
and commands on its stdin. Whatever way the child ends, the rest of its group is killed, so no
dataloader worker or helper outlives a run. This module never imports torch or ultralytics.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from loguru import logger

import agent
from agent.domain.messages import TrainerMessage, decode
from agent.ports import ChildExit, TrainJob
from agent.training.control import STOP_COMMAND
from agent.training.jobfile import write_job
from agent.training.procgroup import group_alive, signal_group

CHILD_MODULE: Final = "agent.training.child"
CUDA_VISIBLE_DEVICES: Final = "CUDA_VISIBLE_DEVICES"
CHILD_LOG: Final = "child.log"
TAIL_LINES: Final = 20
_MAX_LINE = 1 << 20  # a message line longer than this is malformed
_DRAIN_AFTER_EXIT = 2.0  # how long to read what is still buffered once the group is gone
_REAP_TIMEOUT = 10.0  # how long SIGKILLed stragglers may take to disappear
_REAP_POLL = 0.02
_TAIL_BYTES = 64 * 1024
_IMPORT_ROOT = Path(agent.__file__).resolve().parent.parent
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")


class _End:
    """Queue sentinel: no more messages."""


_END: Final = _End()


class ChildTrainer:
    """The Trainer port: each `start` spawns one child process in its own process group."""

    def __init__(
        self,
        *,
        stop_grace: float,
        kill_grace: float,
        offline: bool,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        module: str = CHILD_MODULE,
    ) -> None:
        """`env`: the child's whole environment (None: inherit ours); `module`: its entry point."""
        self._stop_grace = stop_grace
        self._kill_grace = kill_grace
        self._offline = offline
        self._python = python
        self._env = None if env is None else dict(env)
        self._module = module

    def _child_env(self, job: TrainJob) -> dict[str, str] | None:
        """The child's environment, pinned to the devices its run holds."""
        if job.visible_devices is None:
            return self._env
        env = dict(os.environ if self._env is None else self._env)
        env[CUDA_VISIBLE_DEVICES] = job.visible_devices
        # Device indexes then mean what nvidia-smi shows, whatever order CUDA would pick.
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        return env

    async def start(self, job: TrainJob) -> ChildProcess:
        job = _absolute(job)
        job.workspace.mkdir(parents=True, exist_ok=True)
        job_path = write_job(job, offline=self._offline)
        log_path = job.workspace / CHILD_LOG
        read_fd, write_fd = os.pipe()
        try:
            with log_path.open("ab") as log_file:
                # One log per workspace across attempts; the tail is read from this attempt's start.
                stamp = datetime.now(UTC).isoformat(timespec="seconds")
                log_file.write(f"--- {stamp} run {job.run_id} attempt {job.attempt}\n".encode())
                log_file.flush()
                log_offset = log_file.tell()
                proc = await asyncio.create_subprocess_exec(
                    self._python,
                    "-u",
                    "-m",
                    self._module,
                    "--job",
                    str(job_path),
                    "--fd",
                    str(write_fd),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    env=self._child_env(job),
                    # `-m` imports from the working directory first: start where this very `agent`
                    # package lives, so the child runs the parent's code; it then moves to its workspace.
                    cwd=_IMPORT_ROOT,
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            # Only the child may hold the write end, so the pipe closes when the child's group is gone.
            os.close(write_fd)
        try:
            child = ChildProcess(
                proc,
                log_path,
                log_offset=log_offset,
                run_id=job.run_id,
                stop_grace=self._stop_grace,
                kill_grace=self._kill_grace,
            )
            await child._open(read_fd)
        except BaseException:
            # Nobody would watch over it: take the whole group down before giving up.
            signal_group(proc.pid, signal.SIGKILL)
            raise
        child.log.debug("trainer child started", trainer=job.request.trainer, workspace=str(job.workspace))
        return child


class ChildProcess:
    """One running child (the TrainingProcess port)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        log_path: Path,
        *,
        log_offset: int = 0,
        run_id: str,
        stop_grace: float,
        kill_grace: float,
    ) -> None:
        self._proc = proc
        self._pgid = proc.pid  # start_new_session: the child leads its own group
        self._log_path = log_path
        self._log_offset = log_offset
        self._stop_grace = stop_grace
        self._kill_grace = kill_grace
        self._queue: asyncio.Queue[TrainerMessage | _End] = asyncio.Queue()
        self._stop_requested = False
        self._stopper: asyncio.Task[None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self.log = logger.bind(run_id=run_id, pid=proc.pid)
        self._exit: asyncio.Task[int] = asyncio.create_task(self._watch_exit(), name=f"child-{proc.pid}-exit")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self._log_path

    async def _open(self, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_MAX_LINE)
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            raise
        self._pump = asyncio.create_task(
            self._read_messages(reader, transport), name=f"child-{self.pid}-messages"
        )

    async def messages(self) -> AsyncIterator[TrainerMessage]:
        """Messages in order until the child's pipe closes; for one consumer."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                self._queue.put_nowait(item)  # a later call ends at once too
                return
            yield item

    async def stop(self, reason: str) -> ChildExit:
        """Ask, then SIGTERM, then SIGKILL the group; returns once the whole group is gone."""
        self._stop_requested = True
        if self._stopper is None:
            self._stopper = asyncio.create_task(self._escalate(reason), name=f"child-{self.pid}-stop")
        # Shielded: a caller giving up must not leave the child half-stopped.
        await asyncio.shield(self._stopper)
        return await self.wait()

    async def wait(self) -> ChildExit:
        """Wait for the child to exit and its group to be reaped."""
        returncode = await asyncio.shield(self._exit)
        if self._pump is not None:
            await asyncio.shield(self._pump)
        return ChildExit(returncode=returncode, stopped=self._stop_requested, tail=self.tail())

    def tail(self, lines: int = TAIL_LINES) -> tuple[str, ...]:
        """The last non-empty lines of the child's log, without terminal escapes or progress redraws."""
        try:
            with self._log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(self._log_offset, size - _TAIL_BYTES))
                data = f.read()
        except OSError:
            return ()
        text = _ANSI.sub(b"", data).replace(b"\r", b"\n").decode("utf-8", errors="replace")
        kept = [line.rstrip() for line in text.split("\n") if line.strip()]
        return tuple(kept[-lines:])

    async def _escalate(self, reason: str) -> None:
        if self._exit.done():
            return
        self.log.info("stopping trainer child", reason=reason)
        await self._send_stop()
        if await self._exited_within(self._stop_grace):
            return
        self.log.warning("trainer child ignored the stop request; sending SIGTERM", grace=self._stop_grace)
        signal_group(self._pgid, signal.SIGTERM)
        if await self._exited_within(self._kill_grace):
            return
        self.log.warning("trainer child ignored SIGTERM; sending SIGKILL", grace=self._kill_grace)
        signal_group(self._pgid, signal.SIGKILL)
        if not await self._exited_within(_REAP_TIMEOUT):
            self.log.error("trainer child still alive after SIGKILL; waiting for it", waited=_REAP_TIMEOUT)

    async def _send_stop(self) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.is_closing():
            return
        try:
            stdin.write(f"{STOP_COMMAND}\n".encode())
            await asyncio.wait_for(stdin.drain(), timeout=self._stop_grace)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the child is already gone or wedged; the signals take over

    async def _exited_within(self, seconds: float) -> bool:
        await asyncio.wait({self._exit}, timeout=seconds)
        return self._exit.done()

    async def _watch_exit(self) -> int:
        returncode = await self._proc.wait()
        if self._proc.stdin is not None:
            self._proc.stdin.close()
            # Lets the subprocess transport finish closing while the loop still runs.
            with contextlib.suppress(OSError):
                await self._proc.stdin.wait_closed()
        if group_alive(self._pgid):
            self.log.info("killing what is left of the trainer's process group", returncode=returncode)
            signal_group(self._pgid, signal.SIGKILL)
            waited = 0.0
            while group_alive(self._pgid) and waited < _REAP_TIMEOUT:
                await asyncio.sleep(_REAP_POLL)
                waited += _REAP_POLL
            if group_alive(self._pgid):
                self.log.error("processes of the trainer's group survived SIGKILL", waited=_REAP_TIMEOUT)
        level = "DEBUG" if returncode == 0 else "WARNING"
        self.log.log(
            level, "trainer child exited", returncode=returncode, stop_requested=self._stop_requested
        )
        return returncode

    async def _read_messages(self, reader: asyncio.StreamReader, transport: asyncio.ReadTransport) -> None:
        try:
            while (line := await self._read_line(reader)) is not None:
                if not line.strip():
                    continue
                try:
                    self._queue.put_nowait(decode(line))
                except (ValueError, TypeError) as exc:
                    self.log.warning("skipping a malformed trainer message", error=str(exc), line=line[:200])
        finally:
            transport.close()
            self._queue.put_nowait(_END)

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next line; None at EOF, or once the group is gone and nothing more arrives."""
        read = asyncio.ensure_future(_readline(reader))
        try:
            await asyncio.wait({read, self._exit}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                # The group is gone, so EOF is imminent unless a process escaped the group with
                # the pipe open: read what is buffered, then give up on it.
                await asyncio.wait({read}, timeout=_DRAIN_AFTER_EXIT)
            if not read.done():
                self.log.warning("message pipe still open after the trainer's group exited; closing it")
                return None
            return read.result()
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read


def _absolute(job: TrainJob) -> TrainJob:
    """The job with absolute paths: the child starts elsewhere and then works in the workspace."""
    dataset = job.dataset
    if dataset is not None:
        dataset = replace(dataset, yaml_path=dataset.yaml_path.resolve())
    return replace(
        job,
        workspace=job.workspace.resolve(),
        dataset=dataset,
        resume_from=None if job.resume_from is None else job.resume_from.resolve(),
    )


async def _readline(reader: asyncio.StreamReader) -> bytes | None:
    while True:
        try:
            line = await reader.readline()
        except ValueError:
            # Over the limit: the reader dropped the line; the rest of it fails to decode and is skipped.
            logger.warning("skipping an oversized trainer message", limit=_MAX_LINE)
            continue
        return line or None
