-- The most GPUs one registered worker can give a single run: the fewer of its slots and its GPUs.
select coalesce(max(least(
    coalesce(slots, 1),
    case when jsonb_typeof(gpus) = 'array' then jsonb_array_length(gpus) else 0 end
)), 0) as largest
from public.trainer_workers
