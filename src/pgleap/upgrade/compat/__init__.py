"""Version facts: every version-gated SQL text lives here, chosen by server_version_num."""

from pgleap.upgrade.compat.facts import Facts, UnsupportedVersionError, facts_for
from pgleap.upgrade.compat.types import binary_safe

__all__ = ["Facts", "UnsupportedVersionError", "binary_safe", "facts_for"]
