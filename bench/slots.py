"""Device slots: one agent with four fake devices and twelve runs needing 1, 2 or 4 of them.

    python bench/slots.py [--quick]

One `python -m agent run` process with DEVICES=0,1,2,3 (fake: nothing here needs a GPU; each
child is still pinned with CUDA_VISIBLE_DEVICES) on a real Postgres. The bench inserts twelve
queued runs of the fake trainer at once, each asking for 1, 2 or 4 devices (`device` 0, "0,1" or
[0,1,2,3]) and lasting one to three fake epochs, and waits until all are completed.

From the rows: each run holds its devices from `started_at` (the claim) to `completed_at` (the
final write), a little less than the agent holds the slot, so the measures below are not
flattered. From the agent's log: the devices each run was given ("run holds devices").
- max_busy_slots: the most devices held at once (4 when the slots are fully used);
- overbooked: instants at which two runs held the same device, or more than 4 were held (0);
- utilization: busy slot-seconds over available slot-seconds (4 x the time) while at least one
  run was still queued, that is from the first insert to the last claim. Gaps come from the
  claim path (a finished run wakes a poll, the poll hints, the claim) and from runs that do not
  fit the free slots (a 4-device run waits for every slot).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import AgentProcess, Bench, Postgres, agent_env, emit, log, machine, parse_args, wait_until

DEVICES = ("0", "1", "2", "3")
NEEDS = (4, 1, 2, 1, 4, 2, 1, 1, 2, 4, 1, 2)
AS_DEVICE: dict[int, object] = {1: 0, 2: "0,1", 4: [0, 1, 2, 3]}


def main() -> None:
    args = parse_args()
    epoch_s = 0.4 if args.quick else 1.0
    started = time.monotonic()
    with Bench() as bench:
        db = Postgres(bench).database()
        env = agent_env(bench.tmp / "agent", "bench-slots", database_url=db.url, DEVICES=",".join(DEVICES))
        agent = AgentProcess(env, bench.tmp / "agent.log").start(bench)
        agent.wait_ready()
        ids: list[str] = []
        with db.connect() as conn:
            for i, need in enumerate(NEEDS):
                config = {
                    "trainer": "fake",
                    "epochs": 1 + i % 3,
                    "fakeEpochSeconds": epoch_s,
                    "device": AS_DEVICE[need],
                }
                ids.append(db.insert_run(conn, config)[0])
            log(f"inserted {len(ids)} runs needing {list(NEEDS)} devices")

            def all_done() -> bool:
                done = conn.execute(
                    "select count(*) from training_runs where status = 'completed' and id = any(%s::uuid[])",
                    (ids,),
                ).fetchone()
                return done is not None and done[0] == len(ids)

            wait_until(all_done, 600, "every run completed", interval=0.2)
            rows = conn.execute(
                "select id::text, created_at, started_at, completed_at from training_runs"
                " where id = any(%s::uuid[])",
                (ids,),
            ).fetchall()
        held = {r["run_id"]: tuple(r["devices"]) for r in agent.logged("run holds devices")}

    need_of = dict(zip(ids, NEEDS, strict=True))
    spans = [(run_id, start, end) for run_id, _, start, end in rows]
    first_insert = min(created for _, created, _, _ in rows)
    last_claim = max(start for _, _, start, _ in rows)
    result = {
        "bench": "slots",
        "devices": len(DEVICES),
        "runs": len(ids),
        "needs": list(NEEDS),
        "max_busy_slots": max_busy(spans, need_of),
        "overbooked": overbooked(spans, held),
        "utilization": round(utilization(spans, need_of, first_insert, last_claim, len(DEVICES)), 3),
        "queued_s": round((last_claim - first_insert).total_seconds(), 2),
        "epoch_s": epoch_s,
        "wall_s": round(time.monotonic() - started, 1),
        **machine(),
    }
    emit(result)


Span = tuple[str, datetime, datetime]


def _instants(spans: list[Span]) -> list[datetime]:
    return sorted({t for _, start, end in spans for t in (start, end)})


def _running_at(spans: list[Span], t: datetime) -> list[str]:
    return [run_id for run_id, start, end in spans if start <= t < end]


def max_busy(spans: list[Span], need_of: dict[str, int]) -> int:
    return max(sum(need_of[r] for r in _running_at(spans, t)) for t in _instants(spans))


def overbooked(spans: list[Span], held: dict[str, tuple[str, ...]]) -> int:
    bad = 0
    for t in _instants(spans):
        devices = [d for r in _running_at(spans, t) for d in held.get(r, ())]
        if len(devices) != len(set(devices)) or len(devices) > len(DEVICES):
            bad += 1
    missing = [r for r, _, _ in spans if r not in held]
    if missing:
        raise RuntimeError(f"no 'run holds devices' log line for {missing}")
    return bad


def utilization(
    spans: list[Span], need_of: dict[str, int], start: datetime, end: datetime, devices: int
) -> float:
    window = (end - start).total_seconds()
    if window <= 0:
        return 1.0
    busy = 0.0
    for run_id, s, e in spans:
        overlap = (min(e, end) - max(s, start)).total_seconds()
        busy += need_of[run_id] * max(0.0, overlap)
    return busy / (devices * window)


if __name__ == "__main__":
    main()
