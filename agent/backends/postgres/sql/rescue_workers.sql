-- Workers that stopped refreshing their registry row (host died, agent killed): offline, with no
-- current run, so the app stops showing a dead host as busy. A live agent rewrites its row every
-- heartbeat, so it is never older than the staleness bound.
update public.trainer_workers
set status = 'offline',
    current_run = null,
    current_runs = '[]'::jsonb
where last_seen < now() - make_interval(secs => %(stale_after)s)
  and (status is distinct from 'offline' or current_run is not null
       or coalesce(jsonb_array_length(current_runs), 0) > 0)
returning worker_id
