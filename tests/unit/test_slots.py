"""Device slots: needs, allocation on distinct devices, capacity, and how DEVICES is read."""

from __future__ import annotations

import itertools
import random

import pytest

from agent.config import ConfigError, Settings, cuda_visible_devices
from agent.core.slots import CPU, SlotPool, child_device, devices_needed
from agent.domain.request import parse_request
from agent.domain.run import RunRow
from agent.domain.status import RunStatus
from agent.wiring import Gpu, plan_devices


@pytest.mark.parametrize(
    ("device", "need"),
    [(None, 1), ("0", 1), ("3", 1), ("cuda:1", 1), ("cpu", 1), ("mps", 1), ("0,1", 2), ("0,1,2,3", 4)],
)
def test_devices_needed_counts_a_list_of_indexes(device: str | None, need: int) -> None:
    assert devices_needed(device) == need


def test_a_run_takes_distinct_free_devices_and_gives_them_back() -> None:
    pool = SlotPool(("0", "1", "2", "3"))
    a = pool.acquire("a", 1)
    b = pool.acquire("b", 2)
    assert a is not None and b is not None
    assert a.devices == ("0",) and b.devices == ("1", "2")
    assert (pool.busy, pool.free) == (3, 1)
    assert pool.acquire("c", 2) is None, "only one device is free"
    assert not pool.fits(2) and pool.fits(1)
    pool.release("b")
    c = pool.acquire("c", 2)
    assert c is not None and c.devices == ("1", "2") and c.visible == "1,2"
    assert pool.acquire("d", 4) is None
    assert pool.can_ever_fit(4) and not pool.can_ever_fit(5)


def test_random_acquire_and_release_never_overbooks_a_device() -> None:
    rng = random.Random(3)
    pool = SlotPool(("0", "1", "2", "3"))
    held: dict[str, tuple[str, ...]] = {}
    for step in range(2000):
        if held and rng.random() < 0.45:
            run = rng.choice(sorted(held))
            pool.release(run)
            del held[run]
        else:
            need = rng.choice((1, 2, 4))
            got = pool.acquire(f"r{step}", need)
            free_before = 4 - sum(map(len, held.values()))
            assert (got is not None) == (need <= free_before)
            if got is not None:
                assert len(set(got.devices)) == need
                held[got.run_id] = got.devices
        in_use = list(itertools.chain.from_iterable(held.values()))
        assert len(in_use) == len(set(in_use)) == pool.busy <= 4


def test_more_slots_than_devices_share_devices_evenly() -> None:
    pool = SlotPool(("0", "1"), capacity=4)
    got = [pool.acquire(f"r{i}", 1) for i in range(5)]
    assert [g.devices for g in got[:4] if g] == [("0",), ("1",), ("0",), ("1",)]
    assert got[4] is None
    assert not SlotPool(("0", "1"), capacity=4).can_ever_fit(3), "a run never gets a device twice"


def test_fewer_slots_than_devices_cap_the_runs() -> None:
    pool = SlotPool(("0", "1", "2", "3"), capacity=2)
    assert pool.acquire("a", 1) is not None and pool.acquire("b", 1) is not None
    assert pool.acquire("c", 1) is None
    assert pool.largest_need == 2


def test_the_cpu_is_one_device_with_as_many_slots_as_asked() -> None:
    pool = SlotPool((CPU,), capacity=3)
    assert all(pool.acquire(f"r{i}", 1) for i in range(3))
    assert not pool.can_ever_fit(2)
    allocation = pool.holding("r0")
    assert allocation is not None and allocation.visible == ""


@pytest.mark.parametrize(
    ("requested", "held", "device"),
    [
        ("0", ("2",), "0"),
        (None, ("3",), "0"),
        ("cuda:1", ("1",), "0"),
        ("0,1", ("1", "3"), "0,1"),
        ("cpu", ("0",), "cpu"),
        ("0", (CPU,), "cpu"),
        (None, (CPU,), "cpu"),
    ],
)
def test_the_child_sees_its_devices_as_zero_to_k(
    requested: str | None, held: tuple[str, ...], device: str
) -> None:
    assert child_device(requested, held) == device


def test_devices_setting() -> None:
    assert Settings.from_env({"DEVICES": "0, 1,2"}).device_list == ("0", "1", "2")
    assert Settings.from_env({"DEVICES": "cpu"}).device_list == ("cpu",)
    assert Settings.from_env({"DEVICES": "auto"}).device_list is None
    assert Settings.from_env({}).device_list is None
    assert Settings.from_env({}).max_concurrent_runs is None
    for bad in ("0,0", "gpu0", "cpu,0"):
        with pytest.raises(ConfigError, match="DEVICES"):
            Settings.from_env({"DEVICES": bad})
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        Settings.from_env({"METRICS_PORT": "70000"})
    assert cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "1,3"}) == ("1", "3")
    assert cuda_visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert cuda_visible_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == ()
    assert cuda_visible_devices({}) is None


def test_device_plan_names_each_device_and_defaults_to_every_gpu() -> None:
    gpus = (Gpu("0", "GPU-a", "NVIDIA H200", 139.8), Gpu("1", "GPU-b", "NVIDIA H200", 139.8))
    plan = plan_devices(Settings(devices="1"), gpus)
    assert (plan.devices, plan.names, plan.memory_gb) == (("1",), ("NVIDIA H200",), 139.8)
    plan = plan_devices(Settings(devices="0,1,2,3"), ())
    assert plan.devices == ("0", "1", "2", "3") and plan.names == ("GPU 0", "GPU 1", "GPU 2", "GPU 3")
    assert plan_devices(Settings(devices="cpu"), gpus).devices == (CPU,)


def test_a_gpu_count_in_the_request_asks_for_that_many_devices() -> None:
    def need(configuration: dict[str, object]) -> int:
        return devices_needed(
            parse_request(RunRow("r", RunStatus.QUEUED, "d.yaml", None, configuration)).device
        )

    assert need({"gpuCount": 4}) == 4
    assert need({"device": [0, 1]}) == 2
    assert need({"device": 3}) == 1
    assert need({}) == 1
