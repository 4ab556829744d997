insert into public.training_runs
    (status, data_yaml, base_model, configuration, cancel_requested, run_name, project_id, step_id)
values ('queued', %(data_yaml)s, %(base_model)s, %(configuration)s, false, %(run_name)s,
        %(project_id)s::uuid, %(step_id)s::uuid)
returning id
