"""Our SQL on a real PostgreSQL, workflows and workers on a real Temporal dev server."""
