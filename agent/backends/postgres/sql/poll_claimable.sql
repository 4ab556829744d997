-- The claimable predicate of the row contract; served by training_runs_claimable_idx.
select id
from public.training_runs
where status in ('queued', 'running')
  and started_at is null
  and worker_id is null
  and cancel_requested is not true
order by created_at, id
limit %(limit)s
