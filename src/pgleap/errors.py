"""Exception types shared across pgleap: each message says what happened and what to do."""


class PgleapError(Exception):
    """Base class of every error pgleap raises on purpose."""


class ConfigError(PgleapError):
    """The configuration file is missing, unparseable, or has an invalid key."""


class ServerUnavailableError(PgleapError):
    """A PostgreSQL server pgleap must talk to cannot be reached or refused us."""


class AuthenticationError(PgleapError):
    """Authentication failed, between a client and pgleap or pgleap and a server."""
