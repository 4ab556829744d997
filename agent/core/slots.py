"""Device slots: how many devices a run asks for, and which of this host's devices it gets.

Pure bookkeeping, independent of CUDA: a device is a name ("0", "1", a GPU UUID, or "cpu").
The host has `capacity` slots spread evenly over its devices (one per device by default; several
per device when an operator lets small runs share a GPU). A run needing k devices takes k free
slots on k distinct devices, the least loaded first, so a multi-GPU run never lands twice on the
same GPU and single-device runs spread out before they stack.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

CPU = "cpu"
_INDEX_LIST = re.compile(r"^\d+(,\d+)+$")


def devices_needed(device: str | None) -> int:
    """How many devices a request's normalized `device` asks for: "0,1" is two, anything else one."""
    # The indexes a row names are not this host's physical GPUs: a run gets free devices, pinned by
    # CUDA_VISIBLE_DEVICES, so only the count of a list matters.
    if device is not None and _INDEX_LIST.match(device):
        return len(set(device.split(",")))
    return 1


def child_device(device: str | None, held: Sequence[str]) -> str:
    """The `device` the trainer child should use, seeing only the devices it holds as 0..k-1."""
    if not held or held[0] == CPU:
        # A CPU slot: the child sees no GPU at all.
        return "mps" if device == "mps" else CPU
    if device in (CPU, "mps"):
        return device
    return ",".join(str(i) for i in range(len(held)))


@dataclass(frozen=True, slots=True)
class Allocation:
    run_id: str
    devices: tuple[str, ...]

    @property
    def visible(self) -> str:
        """The value of CUDA_VISIBLE_DEVICES for the child ("" hides every GPU from a CPU run)."""
        return "" if self.devices == (CPU,) else ",".join(self.devices)


class SlotPool:
    """Which runs hold which devices; the agent claims a run only when `fits` says so."""

    def __init__(self, devices: Sequence[str], capacity: int | None = None) -> None:
        if not devices:
            raise ValueError("a slot pool needs at least one device")
        if len(set(devices)) != len(devices):
            raise ValueError(f"duplicate devices in {list(devices)}")
        self.devices: tuple[str, ...] = tuple(devices)
        self.capacity = len(self.devices) if capacity is None else capacity
        if self.capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.per_device = math.ceil(self.capacity / len(self.devices))
        self._load = dict.fromkeys(self.devices, 0)
        self._held: dict[str, Allocation] = {}

    @property
    def total(self) -> int:
        return self.capacity

    @property
    def busy(self) -> int:
        return sum(len(a.devices) for a in self._held.values())

    @property
    def free(self) -> int:
        return self.capacity - self.busy

    @property
    def largest_need(self) -> int:
        """The most devices one run can ever get on this host."""
        return min(len(self.devices), self.capacity)

    def can_ever_fit(self, need: int) -> bool:
        return 1 <= need <= self.largest_need

    def fits(self, need: int) -> bool:
        return self._pick(need) is not None

    def holding(self, run_id: str) -> Allocation | None:
        return self._held.get(run_id)

    def acquire(self, run_id: str, need: int) -> Allocation | None:
        """Take `need` slots on distinct devices for `run_id`; None when they are not free now."""
        if run_id in self._held:
            raise ValueError(f"run {run_id} already holds {self._held[run_id].devices}")
        picked = self._pick(need)
        if picked is None:
            return None
        for device in picked:
            self._load[device] += 1
        allocation = Allocation(run_id, picked)
        self._held[run_id] = allocation
        return allocation

    def release(self, run_id: str) -> None:
        allocation = self._held.pop(run_id, None)
        if allocation is not None:
            for device in allocation.devices:
                self._load[device] -= 1

    def _pick(self, need: int) -> tuple[str, ...] | None:
        if not self.can_ever_fit(need) or self.busy + need > self.capacity:
            return None
        open_ = [d for d in self.devices if self._load[d] < self.per_device]
        if len(open_) < need:
            return None
        # Least loaded first; the device order breaks ties, so allocations are predictable.
        order = {d: i for i, d in enumerate(self.devices)}
        chosen = sorted(open_, key=lambda d: (self._load[d], order[d]))[:need]
        return tuple(sorted(chosen, key=order.__getitem__))
