"""Pre-flight check: what the target major will reject or answer differently (rules, workload, reports)."""

from pgleap.upgrade.check.model import CheckReport, Finding, Inventory, QueryResult, Rule, Severity, TargetInfo
from pgleap.upgrade.check.rules import RULES, by_major, rule, rules_for
from pgleap.upgrade.check.run import CheckError, run_check

__all__ = [
    "RULES",
    "CheckError",
    "CheckReport",
    "Finding",
    "Inventory",
    "QueryResult",
    "Rule",
    "Severity",
    "TargetInfo",
    "by_major",
    "rule",
    "rules_for",
    "run_check",
]
