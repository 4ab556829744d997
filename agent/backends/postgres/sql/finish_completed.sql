-- Fenced final write. A retry after a lost response finds the row already finished by this
-- lease (the second exists, evaluated on the snapshot before the update) and still succeeds.
with done as (
    update public.training_runs
    set status = 'completed',
        completed_at = now(),
        trained_model_url = %(trained_model_url)s,
        results = (case when jsonb_typeof(results) = 'object' then results else '{}'::jsonb end)
                  || %(results)s::jsonb
    where id = %(id)s
      and worker_id = %(worker_id)s
      and attempt = %(attempt)s
      and status in ('running', 'canceling')
    returning id
)
select exists (select 1 from done)
    or exists (select 1 from public.training_runs
               where id = %(id)s and worker_id = %(worker_id)s and attempt = %(attempt)s
                 and status = 'completed') as landed
