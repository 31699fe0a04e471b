"""bridged: an ESP32 running ESP-AT, emulated on a Linux serial port."""

__version__ = "0.1.0"
