"""The HTTP client side: a small REST client of the API and the terminal views built on
it (``submit``'s progress bar, ``top``). Talks to the API only, never to Redis; may
import ``model`` and ``config``."""
