"""saturnos-agent run | submit | cancel | list | watch | demo | migrate | doctor"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from agent import __version__, logs
from agent.config import ConfigError, Settings, legacy_settings_present
from agent.domain.errors import AgentError
from agent.domain.run import NewRun, RunRow
from agent.domain.status import RunStatus
from agent.ports import RunAdmin
from agent.wiring import build_agent, detect_offline, ensure_dirs, open_backends

if TYPE_CHECKING:
    from agent.doctor import Report

EXIT_BY_STATUS = {RunStatus.COMPLETED: 0, RunStatus.FAILED: 1, RunStatus.CANCELED: 3}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        if args.func is cmd_doctor:
            from agent.doctor import settings_error_report

            return _print_doctor(args, settings_error_report(exc))
        print(f"saturnos-agent: {exc}", file=sys.stderr)
        return 2
    logs.setup(settings.log_level, settings.log_json)
    try:
        result: int = asyncio.run(args.func(args, settings))
        return result
    except AgentError as exc:
        print(f"saturnos-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saturnos-agent", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve training runs until SIGTERM/SIGINT")
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="insert a run; prints its id")
    submit.add_argument("data_yaml", help="dataset YAML: path, path under DATASET_ROOT, storage: URI or URL")
    submit.add_argument("--model", dest="base_model", help="YOLOv8n|s|m|l|x, or a .pt/.yaml path")
    submit.add_argument("--task", choices=("detect", "segment"))
    submit.add_argument("--epochs", type=int)
    submit.add_argument("--batch", dest="batchSize", type=int)
    submit.add_argument("--imgsz", dest="imgSize", type=int)
    submit.add_argument("--device")
    submit.add_argument("--trainer", choices=("ultralytics", "fake"))
    submit.add_argument(
        "--scratch", action="store_true", help="train from the model yaml (pretrained: false)"
    )
    submit.add_argument("--config", default="{}", help="extra configuration as a JSON object")
    submit.add_argument("--watch", action="store_true", help="then watch it until it ends")
    submit.set_defaults(func=cmd_submit)

    cancel = sub.add_parser("cancel", help="press the cancel button of a run")
    cancel.add_argument("run_id")
    cancel.set_defaults(func=cmd_cancel)

    ls = sub.add_parser("list", help="recent runs")
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(func=cmd_list)

    watch = sub.add_parser("watch", help="live progress of a run until it ends")
    watch.add_argument("run_id")
    watch.set_defaults(func=cmd_watch)

    demo = sub.add_parser("demo", help="train a small real model end to end on a synthetic dataset")
    demo.add_argument("--task", choices=("detect", "segment"), default="detect")
    demo.add_argument("--epochs", type=int, default=40)
    demo.add_argument("--imgsz", type=int, default=128)
    demo.set_defaults(func=cmd_demo)

    mig = sub.add_parser("migrate", help="apply the schema migration (idempotent)")
    mig.add_argument("--print", action="store_true", help="print the SQL (for the Supabase SQL editor)")
    mig.set_defaults(func=cmd_migrate)

    doc = sub.add_parser(
        "doctor", help="check settings, database, grants, Realtime, storage, GPUs, weights and disk"
    )
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.set_defaults(func=cmd_doctor)
    return p


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    for name in legacy_settings_present():
        logger.bind(setting=name).info("legacy setting accepted and not needed by this agent")
    ensure_dirs(settings)
    offline = await detect_offline(settings)
    async with open_backends(settings) as backends:
        agent = build_agent(settings, backends, offline=offline)
        logger.bind(backend=settings.backend, offline=offline, worker=settings.worker_id).info("starting")
        _install_signal_handlers(agent)
        reason = await agent.run()
    print(json.dumps({"stopped": reason}), flush=True)
    return 0


def _install_signal_handlers(agent: Any) -> None:
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def on_signal(sig: signal.Signals) -> None:
        seen.append(sig)
        if len(seen) == 1:
            agent.stop(f"signal {sig.name}")
            return
        logger.bind(signal=sig.name).warning("second signal: exiting now")
        agent.kill_children()
        os._exit(130)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        print(f"saturnos-agent: --config is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(config, dict):
        print("saturnos-agent: --config must be a JSON object", file=sys.stderr)
        return 2
    for key in ("task", "epochs", "batchSize", "imgSize", "device", "trainer"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.scratch:
        config["pretrained"] = False
    data_yaml = _absolute_if_local(args.data_yaml)
    async with open_backends(settings) as backends:
        run_id = await backends.admin.submit(NewRun(data_yaml, args.base_model, config))
        print(run_id, flush=True)
        if args.watch:
            return await watch(backends.admin, run_id)
    return 0


def _absolute_if_local(data_yaml: str) -> str:
    """A path that exists here is sent absolute, so an agent started elsewhere finds it."""
    if "://" in data_yaml or data_yaml.startswith("storage:") or not Path(data_yaml).exists():
        return data_yaml
    return str(Path(data_yaml).resolve())


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with open_backends(settings) as backends:
        if not await backends.admin.request_cancel(args.run_id):
            print(f"saturnos-agent: no active run {args.run_id}", file=sys.stderr)
            return 1
    print(f"cancel requested for {args.run_id}")
    return 0


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    async with open_backends(settings) as backends:
        rows = await backends.admin.list_runs(args.limit)
    print(f"{'id':36}  {'status':9}  {'progress':>8}  {'worker':20}  created")
    for row in rows:
        pct = _progress(row).get("percent")
        pct_s = f"{pct:.1f}%" if isinstance(pct, (int, float)) else "-"
        created = row.created_at.strftime("%Y-%m-%d %H:%M:%S") if row.created_at else "-"
        print(f"{row.id:36}  {row.status.value:9}  {pct_s:>8}  {(row.worker_id or '-'):20}  {created}")
    return 0


async def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    async with open_backends(settings) as backends:
        return await watch(backends.admin, args.run_id)


def _progress(row: RunRow) -> dict[str, Any]:
    progress = (row.results or {}).get("progress")
    return progress if isinstance(progress, dict) else {}


def render(row: RunRow, width: int = 30) -> str:
    p = _progress(row)
    pct = float(p.get("percent") or 0.0)
    filled = int(width * pct / 100)
    bar = "#" * filled + "." * (width - filled)
    metrics = (row.results or {}).get("metrics") or {}
    map50 = metrics.get("metrics/mAP50(M)", metrics.get("metrics/mAP50(B)"))
    extra = f" mAP50 {map50:.3f}" if isinstance(map50, (int, float)) else ""
    epoch = f"epoch {p.get('epoch', 0)}/{p.get('total_epochs', '?')}"
    return f"[{bar}] {pct:5.1f}% {row.status.value:9} {epoch} eta {p.get('eta') or '--:--:--'}{extra}"


async def watch(admin: RunAdmin, run_id: str, interval: float = 0.5) -> int:
    tty = sys.stdout.isatty()
    last = ""
    while True:
        row = await admin.get(run_id)
        if row is None:
            print(f"saturnos-agent: run {run_id} not found", file=sys.stderr)
            return 1
        line = render(row)
        if line != last:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if row.status.terminal:
            if tty:
                print()
            print(
                f"run {run_id} {row.status.value}" + (f": {row.error_message}" if row.error_message else "")
            )
            return EXIT_BY_STATUS.get(row.status, 1)
        await asyncio.sleep(interval)


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from agent.backends.postgres.migrate import schema_sql

    if args.print:
        print(schema_sql())
        return 0
    if settings.backend == "supabase":
        print(
            "saturnos-agent: with SUPABASE_URL, paste `saturnos-agent migrate --print` into the SQL editor, "
            "or set DATABASE_URL to the project's direct connection string",
            file=sys.stderr,
        )
        return 2
    async with open_backends(settings, migrate_schema=True) as backends:
        print(f"migrated {backends.database_url}")
    return 0


async def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: the doctor's clients (Supabase, Storage) would slow every other command's start.
    from agent.doctor import diagnose

    return _print_doctor(args, await diagnose(settings))


def _print_doctor(args: argparse.Namespace, report: Report) -> int:
    print(report.as_json() if args.json else report.render(), flush=True)
    return 1 if report.failed else 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from agent.datasets.synthetic import make_dataset

    if settings.backend != "embedded":
        print(
            "saturnos-agent: the demo runs on the embedded default; unset SUPABASE_URL/DATABASE_URL",
            file=sys.stderr,
        )
        return 2
    ensure_dirs(settings)
    root = settings.data_dir / "demo" / f"{args.task}-dataset"
    print(f"1/4 generating a synthetic {args.task} dataset in {root}", flush=True)
    # 64 training images: with fewer, 40 epochs are too few optimizer steps to learn the shapes.
    data_yaml = await asyncio.to_thread(make_dataset, root, args.task, train=64, val=16, imgsz=args.imgsz)
    offline = await detect_offline(settings)
    async with open_backends(settings) as backends:
        agent = build_agent(settings, backends, offline=offline)
        _install_signal_handlers(agent)
        serving = asyncio.create_task(agent.run())
        config = {
            "task": args.task,
            "epochs": args.epochs,
            "imgSize": args.imgsz,
            "batchSize": 16,
            "pretrained": False,
            "device": "cpu",
            "workers": 0,
            "plots": False,
        }
        run_id = await backends.admin.submit(NewRun(str(data_yaml), "YOLOv8n", config))
        print(
            f"2/4 submitted run {run_id} (YOLOv8n from scratch, {args.epochs} epochs at {args.imgsz}px)",
            flush=True,
        )
        print("3/4 training (live progress from the row):", flush=True)
        code = await watch(backends.admin, run_id)
        agent.stop("demo finished")
        await serving
        row = await backends.admin.get(run_id)
    if row is None:
        return 1
    results = row.results or {}
    print("4/4 result:")
    for key in ("mAP", "mAP50", "precision", "recall"):
        value = results.get(key)
        print(f"  {key:9} {value:.4f}" if isinstance(value, (int, float)) else f"  {key:9} -")
    print(f"  model     {row.trained_model_url}")
    for artifact in results.get("artifacts", []):
        print(f"  artifact  {artifact.get('url')}")
    return code
