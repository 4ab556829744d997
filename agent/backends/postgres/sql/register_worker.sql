insert into public.trainer_workers
    (worker_id, status, last_seen, host, gpus, version, slots, current_run, current_runs)
values
    (%(worker_id)s, %(status)s, now(), %(host)s, %(gpus)s, %(version)s, %(slots)s,
     %(current_run)s, %(current_runs)s)
on conflict (worker_id) do update
set status = excluded.status,
    last_seen = excluded.last_seen,
    host = excluded.host,
    gpus = excluded.gpus,
    version = excluded.version,
    slots = excluded.slots,
    current_run = excluded.current_run,
    current_runs = excluded.current_runs
