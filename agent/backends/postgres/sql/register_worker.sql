insert into public.trainer_workers
    (worker_id, status, last_seen, host, gpus, version, slots, current_run, current_runs, free_slots,
     device_type, compute_type, gpu_name, gpu_memory_gb, cpu_model, ram_gb)
values
    (%(worker_id)s, %(status)s, now(), %(host)s, %(gpus)s, %(version)s, %(slots)s,
     %(current_run)s, %(current_runs)s, %(free_slots)s,
     %(device_type)s, %(compute_type)s, %(gpu_name)s, %(gpu_memory_gb)s, %(cpu_model)s, %(ram_gb)s)
on conflict (worker_id) do update
set status = excluded.status,
    last_seen = excluded.last_seen,
    host = excluded.host,
    gpus = excluded.gpus,
    version = excluded.version,
    slots = excluded.slots,
    current_run = excluded.current_run,
    current_runs = excluded.current_runs,
    free_slots = excluded.free_slots,
    device_type = excluded.device_type,
    compute_type = excluded.compute_type,
    gpu_name = excluded.gpu_name,
    gpu_memory_gb = excluded.gpu_memory_gb,
    cpu_model = excluded.cpu_model,
    ram_gb = excluded.ram_gb
