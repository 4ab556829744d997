-- Stale owned runs that used up their attempts; predicate re-checked as in rescue_cancel.sql.
update public.training_runs
set status = 'failed',
    completed_at = now(),
    error_message = 'worker ' || worker_id || ' stopped heartbeating; attempt ' || attempt
                    || ' of ' || %(max_attempts)s::integer || ' — giving up'
where worker_id is not null
  and status in ('running', 'canceling')
  and heartbeat_at < now() - make_interval(secs => %(stale_after)s)
  and cancel_requested is not true
  and attempt >= %(max_attempts)s::integer
returning id
