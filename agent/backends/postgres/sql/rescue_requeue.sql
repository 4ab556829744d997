-- Stale owned runs with attempts left go back to claimable; predicate re-checked as in
-- rescue_cancel.sql. Results are kept so the next owner can resume from the last checkpoint.
update public.training_runs
set status = 'queued',
    worker_id = null,
    started_at = null,
    heartbeat_at = null
where worker_id is not null
  and status in ('running', 'canceling')
  and heartbeat_at < now() - make_interval(secs => %(stale_after)s)
  and cancel_requested is not true
  and attempt < %(max_attempts)s::integer
returning id
