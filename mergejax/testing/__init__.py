"""Test support: reference implementations the tests and benchmarks compare against
(`numpy_reference`), and small random models (`random_models`)."""
