"""The terminal UI: a Textual face over the ``runner`` core (``runner tui``)."""
