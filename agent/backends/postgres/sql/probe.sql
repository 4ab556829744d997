select to_regclass('public.training_runs') is not null
   and to_regclass('public.trainer_workers') is not null as ready
