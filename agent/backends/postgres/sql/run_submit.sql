insert into public.training_runs (status, data_yaml, base_model, configuration, cancel_requested)
values ('queued', %(data_yaml)s, %(base_model)s, %(configuration)s, false)
returning id
