"""The one place that picks backends from the settings and assembles the agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from agent import __version__
from agent.backends import Backends
from agent.config import ConfigError, Settings, child_environment, cuda_visible_devices, tool_caches
from agent.core.agent import Agent, LoopSettings, Service
from agent.core.pipeline import Deps, PipelineSettings
from agent.core.slots import CPU
from agent.core.workspaces import WorkspacePolicy
from agent.domain.redact import register_secret
from agent.domain.request import Task, TrainingRequest
from agent.domain.run import WorkerInfo
from agent.hardware import detect_hardware, nvidia_smi
from agent.ports import NoMetrics

if TYPE_CHECKING:
    from agent.backends.postgres.embedded import EmbeddedPostgres

# Where pretrained weights come from; unreachable means the host trains offline.
_ONLINE_PROBE = ("github.com", 443)


# Embedded servers this process started or joined: stopped explicitly on a forced exit, which
# skips the atexit hook that normally stops them.
_embedded: list[EmbeddedPostgres] = []


def embedded_database_url(settings: Settings) -> str:
    from agent.backends.postgres.embedded import start_embedded

    server = start_embedded(settings.embedded_pgdata)
    _embedded.append(server)
    return server.url("postgres")


def stop_embedded(*, now: bool = False) -> None:
    """Stop the embedded Postgres unless another live process still uses it (`now`: without waiting)."""
    while _embedded:
        server = _embedded.pop()
        if now:
            server.stop_now()
        else:
            server.stop()


async def _postgres(settings: Settings, url: str, *, migrate_schema: bool) -> Backends:
    from agent.backends.local.blobs import LocalBlobs
    from agent.backends.postgres.events import PostgresEvents
    from agent.backends.postgres.migrate import migrate
    from agent.backends.postgres.store import PostgresStore

    if migrate_schema:
        await migrate(url)
    store = await PostgresStore.connect(url)
    events = PostgresEvents(url)
    return Backends(
        store, store, events, LocalBlobs(settings.artifacts_root), [store.close], database_url=url
    )


async def _supabase(settings: Settings) -> Backends:
    from agent.backends.supabase import open_supabase

    return await open_supabase(settings)


@contextlib.asynccontextmanager
async def open_backends(settings: Settings, *, migrate_schema: bool = True) -> AsyncIterator[Backends]:
    backend = settings.backend
    if backend == "supabase":
        backends = await _supabase(settings)
    elif backend == "postgres":
        assert settings.database_url is not None
        backends = await _postgres(settings, settings.database_url, migrate_schema=migrate_schema)
    else:
        url = await asyncio.to_thread(embedded_database_url, settings)
        logger.bind(pgdata=str(settings.embedded_pgdata)).info("using the embedded Postgres")
        backends = await _postgres(settings, url, migrate_schema=True)
    try:
        yield backends
    finally:
        await backends.close()


async def detect_offline(settings: Settings) -> bool:
    if settings.offline is not None:
        return settings.offline

    def probe() -> bool:
        try:
            socket.create_connection(_ONLINE_PROBE, timeout=1.5).close()
            return False
        except OSError:
            return True

    try:
        return await asyncio.wait_for(asyncio.to_thread(probe), timeout=2.5)
    except TimeoutError:
        return True


def detect_gpus() -> tuple[str, ...]:
    """GPU names from nvidia-smi, without importing torch into the parent."""
    return detect_hardware().gpus


@dataclass(frozen=True)
class Gpu:
    index: str
    uuid: str
    name: str
    memory_gb: float | None


def query_gpus() -> tuple[Gpu, ...]:
    """The host's GPUs from nvidia-smi (which ignores CUDA_VISIBLE_DEVICES), without torch."""
    out = nvidia_smi(["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"])
    if out is None or out.returncode != 0:
        return ()
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            memory: float | None = round(float(parts[3]) / 1024, 1)
        except ValueError:
            memory = None
        gpus.append(Gpu(parts[0], parts[1], parts[2], memory))
    return tuple(gpus)


@dataclass(frozen=True)
class DevicePlan:
    devices: tuple[str, ...]  # what runs get pinned to; ("cpu",) for none
    names: tuple[str, ...]  # a GPU name per device (empty on the CPU)
    memory_gb: float | None


def plan_devices(settings: Settings, gpus: tuple[Gpu, ...] | None = None) -> DevicePlan:
    """DEVICES, else CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists, else the CPU."""
    devices = settings.device_list
    if devices is None:
        visible = cuda_visible_devices()
        if visible is not None:
            devices = visible or (CPU,)
        else:
            gpus = query_gpus() if gpus is None else gpus
            devices = tuple(g.index for g in gpus) or (CPU,)
    if devices == (CPU,):
        return DevicePlan(devices, (), None)
    known = {key: g for g in (query_gpus() if gpus is None else gpus) for key in (g.index, g.uuid)}
    names = tuple(known[d].name if d in known else f"GPU {d}" for d in devices)
    first = known.get(devices[0])
    return DevicePlan(devices, names, first.memory_gb if first else None)


def build_agent(
    settings: Settings, backends: Backends, *, offline: bool, plan: DevicePlan | None = None
) -> Agent:
    from agent.datasets import DatasetPreparer, DiskSpace, SourcePolicy
    from agent.datasets.disk import GB
    from agent.training.parent import ChildTrainer
    from agent.training.weights import resolve_model

    datasets = DatasetPreparer(
        dataset_root=settings.dataset_root,
        cache_root=settings.cache_root,
        concurrency=settings.download_concurrency,
        sources=dict(backends.dataset_sources) or None,
        offline=offline,
        default_bucket=settings.supabase_datasets_bucket,
        relist_after=settings.dataset_relist_after,
        policy=SourcePolicy.for_backend(
            settings.backend,
            _dataset_roots(settings),
            allow_private_urls=settings.allow_private_dataset_urls,
            buckets=settings.dataset_buckets,
            supabase_url=settings.supabase_url,
        ),
        cache_max_bytes=int(settings.dataset_cache_max_gb * GB),
        disk=DiskSpace(int(settings.min_free_disk_gb * GB)),
    )
    trainer = ChildTrainer(
        stop_grace=settings.stop_grace,
        kill_grace=settings.kill_grace,
        offline=offline,
        env=child_environment(settings, offline),
    )

    def resolver(request: TrainingRequest, task: Task) -> str:
        return resolve_model(
            request, task, settings.weights_dir, offline, allow_model_yaml=settings.allow_row_model_yaml
        )

    plan = plan or plan_devices(settings)
    slots = settings.max_concurrent_runs or len(plan.devices)
    metrics = None
    if settings.metrics_port is not None:
        from agent.metrics import PrometheusMetrics

        metrics = PrometheusMetrics()
    deps = Deps(
        metrics=metrics or NoMetrics(),
        store=backends.store,
        blobs=backends.blobs,
        datasets=datasets,
        trainer=trainer,
        resolve_model=resolver,
        settings=pipeline_settings(settings, agent_secret(settings)),
        models=backends.models,
    )
    hardware = detect_hardware()
    worker = WorkerInfo(
        worker_id=settings.worker_id,
        host=socket.gethostname(),
        version=__version__,
        # The GPUs this agent trains on (DEVICES), not every GPU of the host.
        gpus=plan.names,
        slots=slots,
        gpu_memory_gb=plan.memory_gb,
        cpu_model=hardware.cpu_model,
        ram_gb=hardware.ram_gb,
    )
    loop = loop_settings(settings, worker, plan.devices, slots)
    services: dict[str, Service] = {}
    if metrics is not None and settings.metrics_port is not None:
        from agent.metrics import serve

        port = settings.metrics_port
        # `agent` is bound below, before the agent runs its services.
        services["metrics endpoint"] = lambda: serve(port, metrics, agent.health, backends.events)
    agent = Agent(deps, backends.events, loop, services)
    return agent


def pipeline_settings(settings: Settings, checkpoint_key: bytes | None) -> PipelineSettings:
    """The pipeline's part of the settings."""
    return PipelineSettings(
        runs_root=settings.runs_root,
        progress_interval=settings.progress_interval,
        heartbeat_interval=settings.heartbeat_interval,
        checkpoint_interval=settings.checkpoint_interval,
        workspaces=WorkspacePolicy(settings.keep_failed_workspaces, settings.max_kept_workspaces),
        allow_fake_trainer=settings.fake_trainer_allowed,
        checkpoint_key=checkpoint_key,
    )


def loop_settings(
    settings: Settings, worker: WorkerInfo, devices: tuple[str, ...], slots: int
) -> LoopSettings:
    """The agent loop's part of the settings, for `slots` concurrent runs on `devices`."""
    return LoopSettings(
        worker=worker,
        max_concurrent_runs=slots,
        devices=devices,
        poll_interval=settings.poll_interval,
        degraded_poll_interval=settings.degraded_poll_interval,
        heartbeat_interval=settings.heartbeat_interval,
        stale_after=settings.stale_after,
        max_attempts=settings.max_attempts,
        shutdown_mode=settings.shutdown_mode,
    )


def agent_secret(settings: Settings) -> bytes | None:
    """The key checkpoints are signed with: AGENT_SECRET, or on the embedded backend a generated one.

    Only agents hold it (the trainer child does not get it), so a checkpoint that app roles could
    have written to the bucket is never loaded unless an agent signed it.
    """
    if settings.agent_secret:
        return settings.agent_secret.encode()
    if settings.backend != "embedded":
        logger.warning("AGENT_SECRET is not set: checkpoints are not signed and a rescued run starts over")
        return None
    path = settings.agent_secret_file
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    key = path.read_text().strip()
    if len(key) < 16:
        raise ConfigError("AGENT_SECRET", "***", f"the generated key in {path} is damaged; delete it")
    register_secret(key)
    return key.encode()


def ensure_dirs(settings: Settings) -> None:
    folders = (settings.data_dir, settings.runs_root, settings.cache_root, settings.artifacts_root)
    for path in (*folders, *tool_caches(settings).values()):
        Path(path).mkdir(parents=True, exist_ok=True)


def _dataset_roots(settings: Settings) -> tuple[Path, ...]:
    """The operator's dataset folders; on the embedded backend also the demo's, which the agent writes."""
    roots = settings.dataset_roots
    if settings.backend == "embedded" and roots:
        # Only with a root set: without one, local paths are free there anyway.
        return (*roots, settings.data_dir / "demo")
    return roots
