"""Pay orders over HTTP: checkout creates one, reads it, cancels it."""
