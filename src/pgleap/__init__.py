"""pgleap: zero-downtime PostgreSQL major-version upgrades through a wire-protocol proxy."""

__version__ = "0.1.0"
