-- Fenced final write; idempotent for retries, as in finish_completed.sql.
with done as (
    update public.training_runs
    set status = 'failed',
        completed_at = now(),
        error_message = %(error_message)s,
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
                 and status = 'failed') as landed
