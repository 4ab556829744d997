"""Adapters: each implements the ports over one technology and translates its errors."""
