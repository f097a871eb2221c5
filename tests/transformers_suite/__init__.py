"""transformers' own common test mixins run against RAT (see conftest.py and docs/transformers_suite.md)."""
