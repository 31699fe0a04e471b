"""AT command handlers, one module per family; importing this registers them all."""

from bridged.commands import basic, dns, mdns, ota, passthrough, ping, recv, send, server, sntp, ssl, tcpip, wifi  # noqa: F401
from bridged.commands import wifi_reconnect  # noqa: F401
