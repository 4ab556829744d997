update public.training_runs
set cancel_requested = true
where id = %(id)s
  and coalesce(status, '') not in ('completed', 'failed', 'canceled')
returning id
