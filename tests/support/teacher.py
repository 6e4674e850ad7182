"""Fixtures for real teacher servers (owned by the teacher-endpoint work)."""
