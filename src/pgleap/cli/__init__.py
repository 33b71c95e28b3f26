"""The `pgleap` command line."""
