update public.training_runs
set status = 'canceled',
    canceled_at = now(),
    completed_at = now(),
    error_message = %(error_message)s
where id = %(id)s
  and status in ('queued', 'running')
  and worker_id is null
  and cancel_requested is true
returning id
