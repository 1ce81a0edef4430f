"""Example systems built on postroom; not part of the installed package."""
