"""Process-group helpers: signal a whole group and tell whether any live member is left."""

from __future__ import annotations

import os
import signal
from pathlib import Path

_PROC = Path("/proc")


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send `sig` to every process of the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        # A member changed credentials (setuid helper): nothing more we may do to it.
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Pids of the group's live (not zombie) processes; Linux /proc, else a kill(0) probe."""
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members: list[int] = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue  # exited while we looked
        # The command name is in parentheses and may itself contain spaces or parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 3:
            continue
        state, pgrp = fields[0], int(fields[2])
        # Zombies hold no resources; where PID 1 does not reap orphans they stay forever.
        if pgrp == pgid and state not in (b"Z", b"X"):
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    """True while any live process of the group is left."""
    return bool(group_members(pgid))
