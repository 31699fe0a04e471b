"""AT command handlers, one module per family; importing this registers them all."""

from bridged.commands import basic, tcpip, wifi  # noqa: F401
