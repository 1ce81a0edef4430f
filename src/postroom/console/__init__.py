"""The web console (``postroom console``, extra ``postroom[console]``): the ops tools for people.

A thin, server-rendered view over the functions the CLI calls (triage, resolve, upkeep,
audit, pauses): it never implements a replay or a purge of its own. It works air-gapped
(templates, CSS and htmx ship in this package), binds loopback by default, authenticates
every request (a login token or a trusted header set by an auth proxy), records the
authenticated user as the actor of every change, and refuses a change without its
session's CSRF token. Importing :mod:`postroom` never imports this package.
"""
