"""Edge access controller: the gateway agent."""

__version__ = "0.1.0"
