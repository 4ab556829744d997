select id, status, left(data_yaml, 8193) as data_yaml, left(base_model, 8193) as base_model,
    configuration, cancel_requested, worker_id, attempt,
    created_at, started_at, heartbeat_at, completed_at, canceled_at, error_message,
    trained_model_url, results
from public.training_runs
where id = %(id)s
