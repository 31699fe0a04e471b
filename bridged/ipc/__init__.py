"""Inter-process plumbing: shared-memory rings, framed records, control messages."""

from bridged.ipc.control import ControlError, message, recv_message, send_message, socketpair
from bridged.ipc.records import DATA, EOF, Record, get_record, put_record, recv_record
from bridged.ipc.rings import Ring

__all__ = [
    "DATA",
    "EOF",
    "ControlError",
    "Record",
    "Ring",
    "get_record",
    "message",
    "put_record",
    "recv_message",
    "recv_record",
    "send_message",
    "socketpair",
]
