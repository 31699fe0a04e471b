"""Text from the MCU and the network, made safe for a human's terminal."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on escaped (``\\x1b``).

    The SSID, remote names and warning details come from the MCU and the
    network: raw, an ESC or CSI could retitle, clear or rewrite the admin's
    terminal, a newline forge a line, a bidi control reorder one.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
