"""No server: pure rules, static checks of files, parsers; seconds."""
