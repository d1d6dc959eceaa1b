"""sumbatch: an event-sourced batch task service on Redis Streams."""

from sumbatch.config import Settings
from sumbatch.events import Keys

__version__ = "0.1.0"
__all__ = ["Keys", "Settings", "__version__"]
