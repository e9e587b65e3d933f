"""The modelgate HTTP API and command line; composes ``auth`` and ``ml``."""
