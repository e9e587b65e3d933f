"""The protocol's ``.proto`` and the code generated from it (never edited)."""
