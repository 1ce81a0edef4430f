"""postroom: reliable event delivery for Python services.

Configure once at start-up with :func:`configure`; write events in your own transaction
with :func:`publish`; run ``postroom relay`` to send them to RabbitMQ; consume them
idempotently with a :class:`Router`.
"""

from postroom.errors import PostroomError, Reject
from postroom.events import Event
from postroom.message import Message
from postroom.outbox import Outbox, configure, publish
from postroom.redaction import Redaction
from postroom.router import BatchContext, Context, Router
from postroom.settings import Settings
from postroom.tables import metadata

__all__ = [
    "BatchContext",
    "Context",
    "Event",
    "Message",
    "Outbox",
    "PostroomError",
    "Redaction",
    "Reject",
    "Router",
    "Settings",
    "configure",
    "metadata",
    "publish",
]
