"""Tests of the integration tier (the folder sets the marker: tests/conftest.py)."""
