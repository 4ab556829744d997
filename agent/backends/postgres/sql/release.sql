-- Back to claimable; attempt is kept, so the next claim fences with attempt + 1.
update public.training_runs
set status = 'queued',
    worker_id = null,
    started_at = null,
    heartbeat_at = null
where id = %(id)s
  and worker_id = %(worker_id)s
  and attempt = %(attempt)s
  and status in ('running', 'canceling')
returning id
