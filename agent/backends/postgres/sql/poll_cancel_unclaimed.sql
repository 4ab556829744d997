select id
from public.training_runs
where status in ('queued', 'running')
  and worker_id is null
  and cancel_requested is true
order by created_at, id
limit %(limit)s
