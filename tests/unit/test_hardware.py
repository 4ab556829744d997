"""Hardware for the worker registry, parsed from nvidia-smi and /proc without torch."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.domain.run import NewRun, WorkerInfo, dataset_name
from agent.hardware import detect_hardware, parse_cpuinfo, parse_meminfo, parse_nvidia_smi

REPO = Path(__file__).resolve().parents[2]


def test_nvidia_smi_lines() -> None:
    out = "NVIDIA H200, 143771\nNVIDIA H200, 143771\n\n"
    assert parse_nvidia_smi(out) == [("NVIDIA H200", 140.4), ("NVIDIA H200", 140.4)]
    assert parse_nvidia_smi("Tesla T4, [N/A]\n") == [("Tesla T4", None)]
    assert parse_nvidia_smi("") == []


def test_cpuinfo_and_meminfo() -> None:
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  9654 96-Core Processor\n"
    assert parse_cpuinfo(x86) == "AMD EPYC 9654 96-Core Processor"
    assert parse_cpuinfo("processor : 0\nBogoMIPS : 50.00\nModel : Raspberry Pi 5\n") == "Raspberry Pi 5"
    assert parse_cpuinfo("processor : 0\n") is None
    assert parse_meminfo("MemTotal:       131890688 kB\nMemFree: 1 kB\n") == 125.8
    assert parse_meminfo("nothing here") is None


def test_this_host_is_detected_without_importing_torch() -> None:
    code = (
        "import sys; from agent.hardware import detect_hardware as d; h = d();"
        " print(h.ram_gb > 0, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["True", "False"]


def test_worker_info_as_the_app_names_it() -> None:
    cpu = WorkerInfo("w", "h", "1")
    assert (cpu.device_type, cpu.compute_type, cpu.gpu_name) == ("cpu", "cpu", None)
    mixed = WorkerInfo("w", "h", "1", gpus=("A100", "T4"))
    assert (mixed.device_type, mixed.compute_type, mixed.gpu_name) == ("gpu", "cuda", "A100, T4")


def test_a_run_without_a_name_is_named_after_its_dataset_and_time() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert NewRun("/d/bolts/data.yaml").name_at(now) == "bolts_20260102-030405"
    assert NewRun("x.yaml", run_name="  Mine ").name_at(now) == "Mine"
    assert NewRun(None).name_at(now) == "run_20260102-030405"
    assert dataset_name("https://h/storage/v1/object/sign/datasets/p/s/data.yaml?token=t") == "s"
    assert dataset_name("storage:datasets/weird name!.yml") == "weird_name"


def fake_nvidia_smi(folder: Path, script: str) -> None:
    """An executable named nvidia-smi that answers as the real one does (no GPU on test hosts)."""
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)


def test_gpus_from_an_nvidia_smi_on_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, 'echo "NVIDIA H200, 143771"; echo "NVIDIA H200, 143771"')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    hw = detect_hardware()
    assert (hw.gpus, hw.gpu_memory_gb) == (("NVIDIA H200", "NVIDIA H200"), 140.4)
    info = WorkerInfo("w", "h", "1", gpus=hw.gpus, gpu_memory_gb=hw.gpu_memory_gb)
    assert (info.device_type, info.gpu_name) == ("gpu", "2x NVIDIA H200")

    # A broken driver prints its complaint on stdout and fails: no GPU, not a GPU named after it.
    fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed because it couldn\'t communicate"; exit 9')
    assert detect_hardware().gpus == ()
