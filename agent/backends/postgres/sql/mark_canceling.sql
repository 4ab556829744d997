update public.training_runs
set status = 'canceling', heartbeat_at = now()
where id = %(id)s
  and worker_id = %(worker_id)s
  and attempt = %(attempt)s
  and status in ('running', 'canceling')
returning id
