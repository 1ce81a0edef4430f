"""A consumer module with a bug: importing it raises, as a typo in a user's handler would."""

raise RuntimeError("this module fails at import, on purpose")
