"""The admin console: database "pgleap", a simple-query console over the PostgreSQL protocol."""
