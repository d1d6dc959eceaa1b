"""The pure model: events (``events``) and key names (``keys``), ids, the views and the
projection fold that builds them, their stored chunks, task rules, the wire format and
validation, and what a setting's text may say (``ranges``). No I/O; imports nothing of
sumbatch outside ``model``."""
