"""Tests of the unit tier (the folder sets the marker: tests/conftest.py)."""
