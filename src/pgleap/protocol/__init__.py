"""PostgreSQL v3 protocol: message codes, builders, parsers and authentication."""
