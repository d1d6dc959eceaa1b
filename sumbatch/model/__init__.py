"""The pure model: events and key names, ids, the projection fold, task rules, the
wire format and validation. No I/O; imports nothing of sumbatch outside ``model``."""
