-- One conditional update: of any number of concurrent claimers, exactly one gets a row back.
-- The attempt trigger increments attempt because worker_id goes from null to a value.
-- data_yaml and base_model are the row's, so untrusted: long values are cut here, and refused by the agent.
update public.training_runs
set status = 'running',
    worker_id = %(worker_id)s,
    started_at = now(),
    heartbeat_at = now()
where id = %(id)s
  and status in ('queued', 'running')
  and started_at is null
  and worker_id is null
  and cancel_requested is not true
returning id, status, left(data_yaml, 8193) as data_yaml, left(base_model, 8193) as base_model,
    configuration, cancel_requested, worker_id, attempt,
    created_at, started_at, heartbeat_at, completed_at, canceled_at, error_message,
    trained_model_url, results
