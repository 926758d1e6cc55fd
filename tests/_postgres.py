"""Where the PostgreSQL tests find a server, and why they skip when there is none."""

from __future__ import annotations

import os

# Trust-auth PostgreSQL on loopback by default; NEUROTWIN_TEST_POSTGRES overrides (empty: skip).
POSTGRES_URL = os.environ.get("NEUROTWIN_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


def postgres_skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    if not POSTGRES_URL:
        return "NEUROTWIN_TEST_POSTGRES is empty"
    try:
        import psycopg
    except ImportError:
        return "psycopg 3 is not installed (pip install 'psycopg[binary]')"
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_URL} is not reachable ({type(exc).__name__}: {exc})"
    return None
