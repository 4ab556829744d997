-- One statement per poll: claimable runs (the row contract's predicate, oldest first; served by
-- training_runs_claimable_idx) and unclaimed runs whose cancel button was pressed.
(select id, 'claimable' as kind
 from public.training_runs
 where status in ('queued', 'running')
   and started_at is null
   and worker_id is null
   and cancel_requested is not true
 order by created_at, id
 limit %(limit)s)
union all
(select id, 'cancel' as kind
 from public.training_runs
 where status in ('queued', 'running')
   and worker_id is null
   and cancel_requested is true
 order by created_at, id
 limit %(limit)s)
