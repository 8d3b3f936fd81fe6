"""Test support: reference implementations the tests and benchmarks compare against."""
