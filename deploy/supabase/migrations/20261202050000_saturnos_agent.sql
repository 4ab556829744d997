-- saturnos-agent schema. Idempotent: safe to run again, and safe on a database that the old
-- saturnos-trainer script already used (it only adds what is missing; no row or value is lost).
-- Paste it into the Supabase SQL editor, or run `saturnos-agent migrate`.

create table if not exists public.training_runs (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz not null default now(),
    status text not null default 'queued'
);

-- The old script's columns: added when a table predates them.
alter table public.training_runs add column if not exists created_at timestamptz default now();
alter table public.training_runs add column if not exists status text default 'queued';
alter table public.training_runs add column if not exists data_yaml text;
alter table public.training_runs add column if not exists base_model text;
alter table public.training_runs add column if not exists configuration jsonb;
alter table public.training_runs add column if not exists cancel_requested boolean default false;
alter table public.training_runs add column if not exists started_at timestamptz;
alter table public.training_runs add column if not exists completed_at timestamptz;
alter table public.training_runs add column if not exists canceled_at timestamptz;
alter table public.training_runs add column if not exists error_message text;
alter table public.training_runs add column if not exists worker_id text;
alter table public.training_runs add column if not exists trained_model_url text;
alter table public.training_runs add column if not exists results jsonb;
-- New in saturnos-agent: the fencing token and the liveness stamp.
alter table public.training_runs add column if not exists attempt integer not null default 0;
alter table public.training_runs add column if not exists heartbeat_at timestamptz;

create index if not exists training_runs_claimable_idx
    on public.training_runs (created_at)
    where started_at is null and worker_id is null and status in ('queued', 'running');
create index if not exists training_runs_owned_heartbeat_idx
    on public.training_runs (heartbeat_at)
    where worker_id is not null and status in ('running', 'canceling');

create table if not exists public.trainer_workers (
    worker_id text primary key,
    status text not null default 'online',
    last_seen timestamptz not null default now()
);
alter table public.trainer_workers add column if not exists status text default 'online';
alter table public.trainer_workers add column if not exists last_seen timestamptz default now();
alter table public.trainer_workers add column if not exists host text;
alter table public.trainer_workers add column if not exists gpus jsonb;
alter table public.trainer_workers add column if not exists version text;
alter table public.trainer_workers add column if not exists slots integer;
alter table public.trainer_workers add column if not exists current_run text;
alter table public.trainer_workers add column if not exists current_runs jsonb;
-- The device slots free for new runs (the total is `slots`).
alter table public.trainer_workers add column if not exists free_slots integer;

-- What the web app's schema has and shows: a run's name and its project and step (plain ids
-- here; the app's own migrations add the foreign keys), and the hardware of each worker.
alter table public.training_runs add column if not exists run_name text;
alter table public.training_runs add column if not exists project_id uuid;
alter table public.training_runs add column if not exists step_id uuid;
alter table public.trainer_workers add column if not exists device_type text;
alter table public.trainer_workers add column if not exists compute_type text;
alter table public.trainer_workers add column if not exists gpu_name text;
alter table public.trainer_workers add column if not exists gpu_memory_gb double precision;
alter table public.trainer_workers add column if not exists cpu_model text;
alter table public.trainer_workers add column if not exists ram_gb double precision;

-- A table that predates the agent may lack these defaults: a row inserted without a status must
-- still be queued (claimable), as on a fresh install. Defaults that exist are left alone.
do $$
declare
    d record;
begin
    for d in
        select * from (values
            ('training_runs', 'status', '''queued'''),
            ('training_runs', 'cancel_requested', 'false'),
            ('training_runs', 'created_at', 'now()'),
            ('trainer_workers', 'status', '''online'''),
            ('trainer_workers', 'last_seen', 'now()')
        ) as v(table_name, column_name, expr)
    loop
        if exists (select 1 from information_schema.columns c
                   where c.table_schema = 'public' and c.table_name = d.table_name
                     and c.column_name = d.column_name and c.column_default is null) then
            execute format('alter table public.%I alter column %I set default ' || d.expr,
                           d.table_name, d.column_name);
        end if;
    end loop;
end
$$;

-- Each claim (worker_id going from null to a value) increments attempt, in the database, so that
-- a plain PostgREST PATCH and a SQL UPDATE fence the same way.
create or replace function public.saturnos_training_runs_attempt() returns trigger
language plpgsql as $$
begin
    new.attempt := coalesce(old.attempt, 0) + 1;
    return new;
end
$$;
drop trigger if exists saturnos_training_runs_attempt on public.training_runs;
create trigger saturnos_training_runs_attempt
    before update on public.training_runs
    for each row
    when (old.worker_id is null and new.worker_id is not null)
    execute function public.saturnos_training_runs_attempt();

-- Small NOTIFY payloads (the limit is 8000 bytes) for the postgres backend's LISTEN stream,
-- only for changes that matter to agents: not for every progress write. A delete is one too: the
-- owner of a deleted run stops its training at once.
create or replace function public.saturnos_training_runs_notify() returns trigger
language plpgsql as $$
declare
    r public.training_runs%rowtype;
begin
    if tg_op = 'DELETE' then
        r := old;
    else
        r := new;
    end if;
    perform pg_notify('saturnos_training_runs', json_build_object(
        'id', r.id,
        'op', tg_op,
        'status', r.status,
        'cancel_requested', coalesce(r.cancel_requested, false),
        'worker_id', r.worker_id,
        'attempt', r.attempt,
        'claimable', (tg_op <> 'DELETE' and r.status in ('queued', 'running') and r.started_at is null
                      and r.worker_id is null and r.cancel_requested is not true)
    )::text);
    return null;
end
$$;
drop trigger if exists saturnos_training_runs_notify_insert on public.training_runs;
create trigger saturnos_training_runs_notify_insert
    after insert on public.training_runs
    for each row execute function public.saturnos_training_runs_notify();
drop trigger if exists saturnos_training_runs_notify_update on public.training_runs;
create trigger saturnos_training_runs_notify_update
    after update on public.training_runs
    for each row
    when (old.status is distinct from new.status
          or old.cancel_requested is distinct from new.cancel_requested
          or old.worker_id is distinct from new.worker_id
          or old.started_at is distinct from new.started_at)
    execute function public.saturnos_training_runs_notify();
drop trigger if exists saturnos_training_runs_notify_delete on public.training_runs;
create trigger saturnos_training_runs_notify_delete
    after delete on public.training_runs
    for each row execute function public.saturnos_training_runs_notify();

-- On Supabase, Realtime delivers changes of the tables in this publication: training_runs for
-- the agents' hints, trainer_workers for each agent's echo of its own registry write (the proof
-- that its stream is alive while it has no run).
do $$
declare
    t text;
begin
    if exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
        foreach t in array array['training_runs', 'trainer_workers'] loop
            if not exists (select 1 from pg_publication_tables
                           where pubname = 'supabase_realtime'
                             and schemaname = 'public' and tablename = t) then
                execute format('alter publication supabase_realtime add table public.%I', t);
            end if;
        end loop;
    end if;
end
$$;

-- Grants and row level security, for Supabase (where the API roles exist). New tables in `public`
-- are no longer granted to the API roles by default, so the agent's role gets what it uses, by
-- name. `anon` and `authenticated` get what the SaturnOS app's own tables always gave them (its
-- "anon all" policies): never more. A table without row level security and without any policy
-- (one this migration created) gets both, with the app's policy; a table the app secured is left
-- as the app made it. Plain Postgres (the postgres backend) has no such roles: nothing to do.
do $$
declare
    t text;
    table_oid oid;
begin
    if exists (select 1 from pg_roles where rolname = 'service_role') then
        grant usage on schema public to service_role;
        grant select, insert, update on public.training_runs to service_role;
        grant select, insert, update on public.trainer_workers to service_role;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'anon')
       or not exists (select 1 from pg_roles where rolname = 'authenticated') then
        return;
    end if;
    grant usage on schema public to anon, authenticated;
    foreach t in array array['training_runs', 'trainer_workers'] loop
        execute format('grant select, insert, update, delete on public.%I to anon, authenticated', t);
        table_oid := format('public.%I', t)::regclass;
        if not exists (select 1 from pg_class where oid = table_oid and relrowsecurity)
           and not exists (select 1 from pg_policy where polrelid = table_oid) then
            execute format('alter table public.%I enable row level security', t);
            execute format('create policy %I on public.%I for all to anon, authenticated'
                           ' using (true) with check (true)', t || ' anon all', t);
        end if;
    end loop;
end
$$;
