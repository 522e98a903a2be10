"""Tests of the system tier (the folder sets the marker: tests/conftest.py)."""
