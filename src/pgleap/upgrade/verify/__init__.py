"""Verification: reading source and target at one point, checksums over key ranges, bisecting, re-sync."""
