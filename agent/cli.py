"""saturnos-agent run | submit | cancel | list | show | watch | demo | migrate | doctor"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from agent import __version__, logs
from agent.config import ConfigError, Settings, legacy_settings_present
from agent.core.pipeline import without_secrets
from agent.domain.errors import AgentError, InvalidRequest
from agent.domain.redact import error_message, redact
from agent.domain.request import DEFAULT_BASE_MODEL, parse_request
from agent.domain.run import NewRun, RunRow
from agent.domain.status import RunStatus
from agent.ports import RunAdmin
from agent.wiring import build_agent, detect_offline, ensure_dirs, open_backends, stop_embedded

if TYPE_CHECKING:
    from agent.doctor import Report

# Exit codes, the same for every command (README "Commands").
OK, FAILED, USAGE, CANCELED, INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BY_STATUS = {RunStatus.COMPLETED: OK, RunStatus.FAILED: FAILED, RunStatus.CANCELED: CANCELED}
# How long a forced exit may spend on its best-effort write before it leaves anyway.
FORCED_EXIT_WRITE_S = 2.0
FORCED_EXIT_DEADLINE_S = 6.0

_EXIT_CODES = "exit codes: 0 ok, 1 failed, 2 bad input or settings, 130 interrupted"
_WATCH_EXIT_CODES = (
    "exit codes: 0 completed, 1 failed (or not found), 2 bad input or settings, 3 canceled, 130 interrupted"
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        if args.func is cmd_doctor:
            from agent.doctor import settings_error_report

            return _print_doctor(args, settings_error_report(exc))
        print(f"saturnos-agent: {redact(str(exc))}", file=sys.stderr)
        return USAGE
    level = settings.log_level if args.serves or args.verbose else "WARNING"
    logs.setup(level, settings.log_json)
    try:
        result: int = asyncio.run(args.func(args, settings))
        return result
    except AgentError as exc:
        print(f"saturnos-agent: {redact(str(exc))}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        # `saturnos-agent show RUN --json | head`: the reader left, nothing is wrong.
        sys.stderr.close()
        return OK
    except Exception as exc:
        # A bug, not an operator's mistake: its traceback goes through the log's redaction, never
        # straight to stderr where it could carry a URL with its password.
        logger.opt(exception=exc).error("unexpected error")
        print(
            f"saturnos-agent: unexpected error: {type(exc).__name__}: {error_message(str(exc))}",
            file=sys.stderr,
        )
        return FAILED


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default where it has one (None and False mean 'not given')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


# Settings whose unset value means a default derived from another one.
_DERIVED_DEFAULTS = {
    "runs_dir": "DATA_DIR/runs",
    "dataset_cache_dir": "DATA_DIR/cache/datasets",
    "artifacts_dir": "DATA_DIR/artifacts",
    "offline": "auto",
}


def _settings_help() -> str:
    """Every setting with its default (never its current value: some are secrets)."""
    defaults = Settings(worker_id="<hostname>-<random>")
    shown = []
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        if value is None or value == ():
            value = _DERIVED_DEFAULTS.get(f.name, "-")
        elif isinstance(value, bool):
            value = str(value).lower()
        shown.append(f"  {f.name.upper():28} {value}")
    return "settings (environment variables) and their defaults:\n" + "\n".join(shown)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="saturnos-agent",
        description=__doc__,
        formatter_class=_Help,
        epilog=f"{_EXIT_CODES}; watch, show and submit --watch: 3 canceled.\n"
        "Settings come from the environment (see .env.example and the README's settings table).",
    )
    p.add_argument("--version", action="version", version=__version__)
    p.set_defaults(serves=False)
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log at LOG_LEVEL (otherwise clients log warnings only)"
    )

    def command(name: str, help: str, epilog: str = _EXIT_CODES) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=_Help, parents=[common]
        )

    run = command(
        "run",
        "serve training runs until SIGTERM/SIGINT",
        "A first SIGTERM/SIGINT stops claiming and, by SHUTDOWN_MODE, waits for runs in flight or\n"
        "releases them; a second one kills the trainers, releases (release mode) or fails (wait mode)\n"
        "the runs, stops the embedded Postgres and exits at once.\n"
        "exit codes: 0 stopped cleanly, 1 could not start, 2 bad settings, 130 forced exit (second signal)\n"
        "\n" + _settings_help(),
    )
    # The one command that serves runs logs at LOG_LEVEL; the others stay quiet unless -v.
    run.set_defaults(func=cmd_run, serves=True)

    submit = command(
        "submit",
        "insert a run; prints its id",
        "The request is checked with the agent's own parser before it is inserted.\n"
        + _WATCH_EXIT_CODES
        + " (with --watch; without it 0 inserted)",
    )
    submit.add_argument(
        "data_yaml",
        help="dataset YAML: a path (here, else under the agent's DATASET_ROOT), storage:bucket/path or URL",
    )
    # These defaults are the agent's (domain/request.py): an option not given is left out of the row.
    submit.add_argument(
        "--model",
        dest="base_model",
        metavar="MODEL",
        help=(
            "YOLOv8n|s|m|l|x, YOLO11n|s|m|l|x, or a model file name in WEIGHTS_DIR "
            f"(default: {DEFAULT_BASE_MODEL})"
        ),
    )
    submit.add_argument("--task", choices=("detect", "segment"), help="(default: inferred from the labels)")
    submit.add_argument("--epochs", type=int, metavar="N", help="(default: 100)")
    submit.add_argument(
        "--batch", dest="batchSize", type=int, metavar="N", help="batch size, -1 for auto (default: 16)"
    )
    submit.add_argument(
        "--imgsz", dest="imgSize", type=int, metavar="PX", help="image size in px (default: 640)"
    )
    submit.add_argument("--device", help="GPU index, list, cuda:N or cpu (default: 0; cpu without CUDA)")
    submit.add_argument("--trainer", choices=("ultralytics", "fake"), help="(default: ultralytics)")
    submit.add_argument(
        "--scratch",
        action="store_true",
        help="train from the model yaml instead of pretrained weights (pretrained: false)",
    )
    submit.add_argument("--config", default="{}", metavar="JSON", help="extra configuration as a JSON object")
    submit.add_argument("--name", dest="run_name", metavar="NAME", help="run name shown in the web app")
    submit.add_argument("--project", dest="project_id", metavar="ID", help="the web app's project id")
    submit.add_argument("--step", dest="step_id", metavar="ID", help="the web app's step id")
    submit.add_argument(
        "--no-validate", action="store_true", help="insert without checking the request first"
    )
    submit.add_argument("--watch", action="store_true", help="then watch it until it ends, and show it")
    submit.set_defaults(func=cmd_submit)

    cancel = command(
        "cancel", "press the cancel button of a run", "exit codes: 0 requested, 1 no such active run"
    )
    cancel.add_argument("run_id")
    cancel.set_defaults(func=cmd_cancel)

    ls = command("list", "recent runs: status, progress, mAP50-95, worker, error")
    ls.add_argument("--limit", type=int, default=20, metavar="N", help="how many runs, newest first")
    ls.set_defaults(func=cmd_list)

    show = command(
        "show",
        "one run: status, timings, progress, metrics, model URL, artifacts, error",
        "exit codes: 0 shown, 1 not found, 2 bad input or settings",
    )
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true", help="print the row as one JSON object")
    show.set_defaults(func=cmd_show)

    watch = command("watch", "live progress of a run until it ends, then show it", _WATCH_EXIT_CODES)
    watch.add_argument("run_id")
    watch.set_defaults(func=cmd_watch)

    demo = command(
        "demo",
        "train a small real model end to end on a synthetic dataset",
        "Ctrl-C once: the run finishes (SHUTDOWN_MODE=wait) or is released; twice: exit now, nothing left.\n"
        "exit codes: 0 completed, 1 failed, 2 bad input or settings, 3 canceled, 130 interrupted",
    )
    demo.add_argument("--task", choices=("detect", "segment"), default="detect", help="what to train")
    demo.add_argument("--epochs", type=int, default=40, metavar="N", help="epochs of training")
    demo.add_argument("--imgsz", type=int, default=128, metavar="PX", help="image size, px")
    demo.add_argument(
        "--dataset-only",
        metavar="DIR",
        type=Path,
        help="only write the synthetic dataset into DIR (DIR/data.yaml) and print how to submit it",
    )
    demo.set_defaults(func=cmd_demo)

    mig = command("migrate", "apply the schema migration (idempotent)")
    mig.add_argument("--print", action="store_true", help="print the SQL (for the Supabase SQL editor)")
    mig.set_defaults(func=cmd_migrate)

    doc = command(
        "doctor",
        "check settings, database, grants, Realtime, storage, GPUs, weights and disk",
        "exit codes: 0 all ok (warnings allowed), 1 a check failed",
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
        await agent.run()
    stop_embedded()
    return OK


class _ForcedExit:
    """The second signal: kill trainers, settle runs in one quick write, stop the embedded Postgres, exit."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent
        self._once = threading.Lock()
        self._task: asyncio.Future[None] | None = None

    def start(self) -> None:
        # A wedged loop or database must not keep the process alive: a deadline exits regardless.
        timer = threading.Timer(FORCED_EXIT_DEADLINE_S, self.exit_now)
        timer.daemon = True
        timer.start()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self._agent.abort(within=FORCED_EXIT_WRITE_S)
        finally:
            self.exit_now()

    def exit_now(self) -> None:
        if not self._once.acquire(blocking=False):
            return
        try:
            # Last resort, possibly from the deadline's thread: each step is tried whatever the other did.
            for step in (self._agent.kill_children, lambda: stop_embedded(now=True)):
                with contextlib.suppress(Exception):
                    step()
        finally:
            logger.complete()
            os._exit(INTERRUPTED)


def _install_signal_handlers(agent: Any, notify: Callable[[str], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    seen: list[int] = []
    forced = _ForcedExit(agent)

    def on_signal(sig: signal.Signals) -> None:
        seen.append(sig)
        if len(seen) == 1:
            agent.stop(f"signal {sig.name}")
            if notify is not None:
                waits = agent.settings.shutdown_mode == "wait"
                then = "the run in flight finishes first" if waits else "the run goes back to the queue"
                notify(f"stopping: {then}; press Ctrl-C again to exit now")
            return
        if len(seen) == 2:
            logger.bind(signal=sig.name).warning("second signal: killing trainers and exiting now")
            forced.start()
            return
        forced.exit_now()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def build_new_run(args: argparse.Namespace) -> NewRun:
    """The row `submit` inserts; InvalidRequest-like ValueError for an unusable --config."""
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError("--config must be a JSON object")
    for key in ("task", "epochs", "batchSize", "imgSize", "device", "trainer"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.scratch:
        config["pretrained"] = False
    return NewRun(
        _absolute_if_local(args.data_yaml),
        args.base_model,
        config,
        run_name=args.run_name,
        project_id=args.project_id,
        step_id=args.step_id,
    )


def validate(run: NewRun) -> None:
    """The agent's own parser on the row as it would be inserted; raises InvalidRequest."""
    parse_request(RunRow("", RunStatus.QUEUED, run.data_yaml, run.base_model, run.configuration))


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    try:
        run = build_new_run(args)
        if not args.no_validate:
            validate(run)
    except (ValueError, InvalidRequest) as exc:
        print(f"saturnos-agent: {exc}", file=sys.stderr)
        return USAGE
    local = run.data_yaml is not None and _looks_local(run.data_yaml)
    if local and run.configuration.get("trainer") != "fake" and not Path(str(run.data_yaml)).is_absolute():
        print(
            f"saturnos-agent: note: {run.data_yaml} is not a file here; the agent looks for it under its "
            "DATASET_ROOT",
            file=sys.stderr,
        )
    async with open_backends(settings) as backends:
        run_id = await backends.admin.submit(run)
        print(run_id, flush=True)
        if args.watch:
            return await watch(backends.admin, run_id)
    return OK


def _looks_local(data_yaml: str) -> bool:
    return "://" not in data_yaml and not data_yaml.startswith("storage:")


def _absolute_if_local(data_yaml: str) -> str:
    """A path that exists here is sent absolute, so an agent started elsewhere finds it."""
    if not _looks_local(data_yaml):
        return data_yaml
    path = Path(data_yaml).expanduser()
    return str(path.resolve()) if path.exists() else data_yaml


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with open_backends(settings) as backends:
        if not await backends.admin.request_cancel(args.run_id):
            print(f"saturnos-agent: no active run {args.run_id}", file=sys.stderr)
            return FAILED
    print(f"cancel requested for {args.run_id}")
    return OK


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    async with open_backends(settings) as backends:
        rows = await backends.admin.list_runs(args.limit)
    print(f"{'id':36}  {'status':9}  {'progress':>8}  {'mAP50-95':>8}  {'worker':20}  {'created':19}  error")
    for row in rows:
        pct = _progress(row).get("percent")
        pct_s = f"{pct:.1f}%" if _is_number(pct) else "-"
        map_ = final_metrics(row).get("mAP50-95")
        map_s = f"{map_:.4f}" if map_ is not None else "-"
        created = _when(row.created_at) or "-"
        error = first_line(row.error_message)
        error = error if len(error) <= 100 else error[:99] + "…"
        print(
            f"{row.id:36}  {row.status.value:9}  {pct_s:>8}  {map_s:>8}  {(row.worker_id or '-'):20}  "
            f"{created:19}  {error}".rstrip()
        )
    return OK


async def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    async with open_backends(settings) as backends:
        row = await backends.admin.get(args.run_id)
    if row is None:
        print(f"saturnos-agent: run {args.run_id} not found", file=sys.stderr)
        return FAILED
    print(json.dumps(row_json(row), indent=2) if args.json else render_show(row))
    return OK


async def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    async with open_backends(settings) as backends:
        return await watch(backends.admin, args.run_id)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _progress(row: RunRow) -> dict[str, Any]:
    progress = (row.results or {}).get("progress")
    return progress if isinstance(progress, dict) else {}


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _when(at: datetime | None) -> str | None:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at is not None else None


def _duration(seconds: float) -> str:
    total = max(0, round(seconds))
    h, m, s = total // 3600, total % 3600 // 60, total % 60
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def final_metrics(row: RunRow) -> dict[str, float | None]:
    """mAP50-95, mAP50, precision, recall: the final summary, else the last epoch's metrics."""
    results = row.results or {}
    metrics = results.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    segment = results.get("task") == "segment"
    suffixes = ("(M)", "(B)") if segment else ("(B)",)

    def pick(name: str, summary_key: str | None) -> float | None:
        for s in suffixes:
            value = metrics.get(f"metrics/{name}{s}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        value = results.get(summary_key) if summary_key else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return {
        "mAP50-95": pick("mAP50-95", None),
        "mAP50": pick("mAP50", "mAP50"),
        "precision": pick("precision", "precision"),
        "recall": pick("recall", "recall"),
    }


def row_json(row: RunRow) -> dict[str, Any]:
    """The row as JSON, plus the summary `show` prints."""
    out: dict[str, Any] = {}
    for name in RunRow.__slots__:
        value = getattr(row, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    out["status"] = row.status.value
    out["summary"] = {"metrics": final_metrics(row), "progress": _progress(row)}
    return out


def render_show(row: RunRow) -> str:
    results = row.results or {}
    p = _progress(row)
    asked = " (cancel requested)" if row.cancel_requested and not row.status.terminal else ""
    lines = [("run", row.id), ("status", row.status.value + asked)]
    lines.append(("worker", f"{row.worker_id or '-'} (attempt {row.attempt})"))
    data = without_secrets(row.data_yaml) if row.data_yaml else "-"
    lines.append(("request", f"{row.base_model or DEFAULT_BASE_MODEL} on {data}"))
    for label, at in (
        ("created", row.created_at),
        ("started", row.started_at),
        ("heartbeat", row.heartbeat_at if not row.status.terminal else None),
        ("finished", row.completed_at or row.canceled_at),
    ):
        if at is not None:
            lines.append((label, _when(at) or ""))
    if row.started_at is not None:
        end = row.completed_at or row.canceled_at
        if end is not None:
            lines.append(("took", _duration((end - row.started_at).total_seconds())))
    if p:
        eta = f", eta {p['eta']}" if p.get("eta") and not row.status.terminal else ""
        epoch = f"epoch {p.get('epoch', 0)}/{p.get('total_epochs', '?')}"
        lines.append(("progress", f"{epoch}, {p.get('percent', 0)}%{eta}"))
    metrics = final_metrics(row)
    if any(v is not None for v in metrics.values()):
        for key, value in metrics.items():
            lines.append((key, f"{value:.4f}" if value is not None else "-"))
    if row.trained_model_url:
        lines.append(("model", row.trained_model_url))
    artifacts = results.get("artifacts")
    urls = [
        str(a.get("url") or a.get("path"))
        for a in (artifacts if isinstance(artifacts, list) else [])
        if isinstance(a, dict)
    ]
    plots = [u for u in urls if u.lower().endswith((".png", ".jpg"))]
    lines.extend(("artifact", u) for u in urls if u not in plots)
    if plots:
        folder = plots[0].rsplit("/", 1)[0]  # plots lie side by side in the run folder
        lines.append(("plots", f"{len(plots)} images in {folder}/"))
    if row.error_message:
        for i, text in enumerate(row.error_message.strip().splitlines()):
            lines.append(("error" if i == 0 else "", text))
    return "\n".join(f"{label:10} {value}".rstrip() for label, value in lines)


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


async def watch(admin: RunAdmin, run_id: str, interval: float = 0.5, *, show: bool = True) -> int:
    """Progress until the run ends, then the run as `show` prints it; the exit code by its status."""
    tty = sys.stdout.isatty()
    last = ""
    while True:
        row = await admin.get(run_id)
        if row is None:
            print(f"saturnos-agent: run {run_id} not found", file=sys.stderr)
            return FAILED
        line = render(row)
        if line != last:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = line
        if row.status.terminal:
            if tty:
                print()
            if show:
                print(render_show(row), flush=True)
            return EXIT_BY_STATUS.get(row.status, FAILED)
        await asyncio.sleep(interval)


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from agent.backends.postgres.migrate import schema_sql

    if args.print:
        print(schema_sql())
        return OK
    if settings.backend == "supabase":
        print(
            "saturnos-agent: with SUPABASE_URL, paste `saturnos-agent migrate --print` into the SQL editor, "
            "or set DATABASE_URL to the project's direct connection string",
            file=sys.stderr,
        )
        return USAGE
    async with open_backends(settings, migrate_schema=True) as backends:
        print(f"migrated {redact(backends.database_url or '')}")
    return OK


async def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: the doctor's clients (Supabase, Storage) would slow every other command's start.
    from agent.doctor import diagnose

    return _print_doctor(args, await diagnose(settings))


def _print_doctor(args: argparse.Namespace, report: Report) -> int:
    # Redacted: a settings or connection error may quote a URL with its password.
    print(redact(report.as_json() if args.json else report.render()), flush=True)
    return 1 if report.failed else 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from agent.datasets.synthetic import make_dataset

    if args.dataset_only is not None:
        # 64 training images: with fewer, 40 epochs are too few optimizer steps to learn the shapes.
        data_yaml = await asyncio.to_thread(
            make_dataset, args.dataset_only, args.task, train=64, val=16, imgsz=args.imgsz
        )
        print(data_yaml)
        given = args.dataset_only / "data.yaml"
        print(
            f"submit it with: saturnos-agent submit {given} --model YOLOv8n --scratch "
            f"--imgsz {args.imgsz} --epochs {args.epochs} --watch",
            file=sys.stderr,
        )
        return OK
    if settings.backend != "embedded":
        print(
            "saturnos-agent: the demo runs on the embedded default; unset SUPABASE_URL/DATABASE_URL",
            file=sys.stderr,
        )
        return USAGE
    ensure_dirs(settings)
    root = settings.data_dir / "demo" / f"{args.task}-dataset"
    print(f"1/4 generating a synthetic {args.task} dataset in {root}", flush=True)
    data_yaml = await asyncio.to_thread(make_dataset, root, args.task, train=64, val=16, imgsz=args.imgsz)
    offline = await detect_offline(settings)
    async with open_backends(settings) as backends:
        agent = build_agent(settings, backends, offline=offline)
        _install_signal_handlers(agent, notify=lambda text: print(f"\n{text}", file=sys.stderr, flush=True))
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
        run_id = await backends.admin.submit(NewRun(str(data_yaml), "YOLOv8n", config, run_name="demo"))
        print(
            f"2/4 submitted run {run_id} (YOLOv8n from scratch, {args.epochs} epochs at {args.imgsz}px)",
            flush=True,
        )
        print("3/4 training (live progress from the row):", flush=True)
        watching = asyncio.create_task(watch(backends.admin, run_id, show=False))
        # Ctrl-C stops the agent; in release mode the run goes back to the queue and would never end.
        await asyncio.wait({watching, serving}, return_when=asyncio.FIRST_COMPLETED)
        agent.stop("demo finished")
        await serving
        code = await watching if watching.done() else _stop_watching(watching)
        row = await backends.admin.get(run_id)
    stop_embedded()
    if row is None:
        return FAILED
    print("4/4 result:")
    print(render_show(row))
    print(f"(artifacts are under {settings.artifacts_root}; `saturnos-agent show {run_id}` shows them again)")
    return code


def _stop_watching(watching: asyncio.Task[int]) -> int:
    watching.cancel()
    return INTERRUPTED
