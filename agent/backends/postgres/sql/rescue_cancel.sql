-- Stale owned runs whose cancel button was pressed: nobody is left to stop them, so they end.
-- Rows with no heartbeat at all (claimed by the old script) are never judged stale.
-- The predicate is re-checked on the row's latest version under its lock, so a heartbeat that
-- lands concurrently wins.
update public.training_runs
set status = 'canceled',
    canceled_at = now(),
    completed_at = now(),
    error_message = %(error_message)s
where worker_id is not null
  and status in ('running', 'canceling')
  and heartbeat_at < now() - make_interval(secs => %(stale_after)s)
  and cancel_requested is true
returning id
