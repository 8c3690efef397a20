"""Builders and servers shared by the tests of every room (never a test module)."""
