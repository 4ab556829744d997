-- Fenced heartbeat. Results that are not a JSON object (old rows) are replaced, not appended to.
update public.training_runs
set heartbeat_at = now(),
    results = case
        when %(patch)s::jsonb = '{}'::jsonb then results
        else (case when jsonb_typeof(results) = 'object' then results else '{}'::jsonb end)
             || %(patch)s::jsonb
    end
where id = %(id)s
  and worker_id = %(worker_id)s
  and attempt = %(attempt)s
  and status in ('running', 'canceling')
returning coalesce(cancel_requested, false) as cancel_requested
