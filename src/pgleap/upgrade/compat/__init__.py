"""Version facts: every version-gated SQL text lives here, chosen by server_version_num."""

from pgleap.upgrade.compat.coltypes import binary_safe
from pgleap.upgrade.compat.facts import Facts, UnsupportedVersionError, facts_for, version_num_of

__all__ = ["Facts", "UnsupportedVersionError", "binary_safe", "facts_for", "version_num_of"]
