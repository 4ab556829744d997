"""A local stand-in for a Supabase project: PostgREST, Realtime and Storage over real Postgres."""

from tests.standin.faults import Faults
from tests.standin.server import StandIn

__all__ = ["Faults", "StandIn"]
