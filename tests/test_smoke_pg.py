import psycopg


def test_fresh_database_has_schema(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        cols = {
            r[0]
            for r in conn.execute(
                "select column_name from information_schema.columns where table_name='training_runs'"
            )
        }
    assert {"id", "status", "attempt", "heartbeat_at", "cancel_requested"} <= cols
