"""Postgres backend: psycopg 3 async, LISTEN/NOTIFY, SQL in .sql files."""
