"""Helpers shared by the tests: free ports, readiness waits, and processes that are always stopped."""
