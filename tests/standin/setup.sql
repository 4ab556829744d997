-- What the stand-in needs in a project database, as a new Supabase project has it: the
-- `supabase_realtime` publication (empty), and the stand-in's own schema that captures the row
-- changes of the published tables. Idempotent.

do $$
begin
    if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
        create publication supabase_realtime;
    end if;
exception when duplicate_object then null;
end
$$;

create schema if not exists standin;

-- One row per captured change, written by the writing transaction itself so that every change
-- carries its own row image; the server deletes the rows as it delivers them.
create table if not exists standin.changes (
    id bigserial primary key,
    schema_name text not null,
    table_name text not null,
    type text not null,
    record jsonb,
    old_record jsonb,
    has_pk boolean not null,
    commit_timestamp timestamptz not null default now()
);

-- Security definer: any writer (anon through the REST API too) can record its change. The UTC
-- time zone gives timestamps the `+00:00` offset that Realtime (a UTC session) sends.
create or replace function standin.capture() returns trigger
language plpgsql security definer set search_path = pg_catalog, pg_temp set timezone to 'UTC' as $$
declare
    ident "char";
    keys text[];
    new_row jsonb;
    old_row jsonb;
begin
    if tg_op <> 'DELETE' then
        new_row := to_jsonb(new);
    end if;
    if tg_op <> 'INSERT' then
        select c.relreplident into ident from pg_class c where c.oid = tg_relid;
        if ident = 'f' then
            old_row := to_jsonb(old);
        else
            -- The replica identity is all that the WAL keeps of the old row: the primary key by
            -- default, an index's columns for `replica identity using index`, nothing for `nothing`.
            select array_agg(a.attname::text) into keys
            from pg_index i
            join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
            where i.indrelid = tg_relid
              and ((ident = 'd' and i.indisprimary) or (ident = 'i' and i.indisreplident));
            if keys is not null then
                select jsonb_object_agg(e.key, e.value) into old_row
                from jsonb_each(to_jsonb(old)) e
                where e.key = any(keys);
            end if;
        end if;
    end if;
    insert into standin.changes (schema_name, table_name, type, record, old_record, has_pk)
    values (tg_table_schema, tg_table_name, tg_op, new_row, old_row,
            exists (select 1 from pg_index i where i.indrelid = tg_relid and i.indisprimary));
    perform pg_notify('standin_changes', '');
    return null;
end
$$;

-- Puts the capture trigger on exactly the tables of the publication, for the actions it publishes.
create or replace function standin.sync_capture_triggers() returns void
language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    t record;
begin
    for t in
        with wanted as (
            select distinct format('%I.%I', pt.schemaname, pt.tablename)::regclass as rel,
                   1 + case when p.pubinsert then 4 else 0 end
                     + case when p.pubdelete then 8 else 0 end
                     + case when p.pubupdate then 16 else 0 end as tgtype
            from pg_publication p
            join pg_publication_tables pt on pt.pubname = p.pubname
            where p.pubname = 'supabase_realtime'
        ), existing as (
            select tg.tgrelid::regclass as rel, tg.tgtype::int as tgtype
            from pg_trigger tg
            where tg.tgname = 'standin_capture'
        )
        select coalesce(w.rel, e.rel) as rel, w.tgtype as want, e.tgtype as have
        from wanted w
        full join existing e on e.rel = w.rel
        where w.tgtype is distinct from e.tgtype
    loop
        if t.have is not null then
            execute format('drop trigger standin_capture on %s', t.rel);
        end if;
        if t.want is not null and t.want > 1 then
            execute format(
                'create trigger standin_capture after %s on %s for each row execute function standin.capture()',
                array_to_string(array_remove(array[
                    case when t.want & 4 <> 0 then 'insert' end,
                    case when t.want & 16 <> 0 then 'update' end,
                    case when t.want & 8 <> 0 then 'delete' end], null), ' or '),
                t.rel);
        end if;
    end loop;
end
$$;

create or replace function standin.on_ddl() returns event_trigger
language plpgsql as $$
begin
    perform standin.sync_capture_triggers();
end
$$;

-- Realtime's filter comparison: both sides cast to the column's type, `in` against an array.
create or replace function standin.compare(type_ text, op text, val_1 text, val_2 text) returns boolean
language plpgsql stable as $$
declare
    res boolean;
    symbol text;
begin
    if op = 'is' then
        execute format('select %L::%s is %s', val_1, type_,
                       case lower(val_2) when 'true' then 'true' when 'false' then 'false'
                                         when 'unknown' then 'unknown' else 'null' end)
        into res;
        return res;
    end if;
    if op in ('like', 'ilike', 'match', 'imatch') then
        symbol := case op when 'like' then 'like' when 'ilike' then 'ilike'
                          when 'match' then '~' else '~*' end;
        execute format('select %L::text %s %L::text', val_1, symbol, val_2) into res;
        return res;
    end if;
    symbol := case op when 'eq' then '=' when 'neq' then '!=' when 'lt' then '<' when 'lte' then '<='
                      when 'gt' then '>' when 'gte' then '>=' when 'in' then '= any'
                      when 'isdistinct' then 'is distinct from' end;
    if symbol is null then
        raise exception 'unknown filter operator %', op;
    end if;
    execute format('select %L::%s %s (%L::%s)', val_1, type_, symbol, val_2,
                   case when op = 'in' then type_ || '[]' else type_ end)
    into res;
    return res;
end
$$;

-- Whether a record passes every filter [[column, op, value, negate], ...]; null never passes.
create or replace function standin.filters_match(entity regclass, rec jsonb, filters jsonb) returns boolean
language plpgsql stable as $$
declare
    f jsonb;
    col_type text;
    res boolean;
begin
    for f in select * from jsonb_array_elements(filters) loop
        select a.atttypid::regtype::text into col_type
        from pg_attribute a
        where a.attrelid = entity and a.attname = f ->> 0 and a.attnum > 0 and not a.attisdropped;
        if col_type is null then
            return false;
        end if;
        res := standin.compare(col_type, f ->> 1, rec ->> (f ->> 0), f ->> 2);
        if (f ->> 3)::boolean then
            res := not res;
        end if;
        if not coalesce(res, false) then
            return false;
        end if;
    end loop;
    return true;
end
$$;

-- Realtime's check when a subscription is created: the column exists and the value fits its type.
create or replace function standin.check_filter(entity regclass, col text, op text, val text) returns void
language plpgsql stable as $$
declare
    col_type text;
    n int;
begin
    select a.atttypid::regtype::text into col_type
    from pg_attribute a
    where a.attrelid = entity and a.attname = col and a.attnum > 0 and not a.attisdropped;
    if col_type is null then
        raise exception 'invalid column for filter %', col;
    end if;
    if op = 'in' then
        execute format('select cardinality(%L::%s[])', val, col_type) into n;
        if n > 100 then
            raise exception 'too many values for `in` filter. Maximum 100';
        end if;
    elsif op = 'is' then
        if lower(val) not in ('null', 'true', 'false', 'unknown') then
            raise exception 'invalid value for `is` filter: %', val;
        end if;
    elsif op not in ('like', 'ilike', 'match', 'imatch') then
        execute format('select %L::%s', val, col_type);
    end if;
end
$$;
