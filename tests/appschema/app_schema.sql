-- A database shaped like the SaturnOS web app's (its supabase/migrations), written for the tests:
-- the tables and columns the app reads and writes, its triggers, and its row-level security with
-- the policies that let the anon and authenticated roles do everything. The agent's schema.sql is
-- applied on top, as an operator would on the app's Supabase project.

-- The roles every Supabase project has; the app's policies name them.
do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'anon') then
        create role anon nologin;
    end if;
    if not exists (select 1 from pg_roles where rolname = 'authenticated') then
        create role authenticated nologin;
    end if;
end
$$;
grant usage on schema public to anon, authenticated;

create function public.app_touch_updated_at() returns trigger
language plpgsql as $$
begin
    new.updated_at := now();
    return new;
end
$$;

create table public.projects (
    id uuid primary key default gen_random_uuid(),
    name text not null,
    description text,
    status text not null default 'created',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table public.sop_steps (
    id uuid primary key default gen_random_uuid(),
    project_id uuid not null references public.projects (id) on delete cascade,
    title text not null,
    classes text[] not null default '{}',
    step_number integer not null default 1,
    dataset_yaml_path text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- A name is required; project and step are optional links that outlive neither.
create table public.training_runs (
    id uuid primary key default gen_random_uuid(),
    run_name text not null,
    project_id uuid references public.projects (id) on delete set null,
    step_id uuid references public.sop_steps (id) on delete set null,
    status text not null default 'queued',
    base_model text,
    configuration jsonb,
    data_yaml text,
    results jsonb,
    trained_model_url text,
    created_by text,
    is_deployed boolean not null default false,
    deployment_status text,
    started_at timestamptz,
    completed_at timestamptz,
    worker_id text,
    error_message text,
    cancel_requested boolean not null default false,
    canceled_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index on public.training_runs (project_id);
create index on public.training_runs (step_id);
create index on public.training_runs (status);

create table public.trainer_workers (
    worker_id text primary key,
    status text not null default 'online',
    last_seen timestamptz not null default now(),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create trigger app_projects_updated_at before update on public.projects
    for each row execute function public.app_touch_updated_at();
create trigger app_sop_steps_updated_at before update on public.sop_steps
    for each row execute function public.app_touch_updated_at();
create trigger app_training_runs_updated_at before update on public.training_runs
    for each row execute function public.app_touch_updated_at();
create trigger app_trainer_workers_updated_at before update on public.trainer_workers
    for each row execute function public.app_touch_updated_at();

-- Deleting a project ends its runs in flight as canceled and removes its waiting ones, without
-- asking any worker: the agent must notice by itself.
create function public.app_project_deleted() returns trigger
language plpgsql as $$
begin
    update public.training_runs
    set status = 'canceled',
        cancel_requested = true,
        canceled_at = now(),
        completed_at = now(),
        error_message = 'Project deleted.'
    where project_id = old.id and status in ('running', 'canceling');
    delete from public.training_runs where project_id = old.id and status = 'queued';
    return old;
end
$$;
create trigger app_project_deleted before delete on public.projects
    for each row execute function public.app_project_deleted();

do $$
declare
    t text;
begin
    foreach t in array array['projects', 'sop_steps', 'training_runs', 'trainer_workers'] loop
        execute format('alter table public.%I enable row level security', t);
        execute format('create policy %I on public.%I for all to anon, authenticated using (true) with check (true)',
                       t || ' anon all', t);
        execute format('grant select, insert, update, delete on public.%I to anon, authenticated', t);
    end loop;
end
$$;
