"""Capture: classify statements, group them into transactions, tag txids, append to the change log."""

from pgleap.upgrade.capture.classify import Kind, StatementInfo, classify

__all__ = ["Kind", "StatementInfo", "classify"]
