"""A package so that tests/gpu/conftest.py does not take the module name `conftest` from tests/conftest.py (pytest
imports every non-package conftest as `conftest`), which the test modules here and in tests/ import from."""
