"""Fixtures for a real ZooKeeper server (owned by the discovery work)."""
