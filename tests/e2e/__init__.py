"""Through the interfaces users use: HTTP, the CLI, `payorders dev`, the torture."""
