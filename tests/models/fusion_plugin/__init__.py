"""A fusion type that exists only in the tests, to prove CONTRIBUTING.md's 'Adding a fusion type' steps."""
