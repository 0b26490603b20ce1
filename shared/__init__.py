"""The library every membrane service shares: configuration, logging, the bus, payloads, labels."""

__version__ = "0.1.0"
