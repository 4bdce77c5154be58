"""Reader I/O as typed events (inputs, outputs, tamper, power): they live in `edge.readers.events` with
every other reader event; re-exported here for the OSDP package's callers."""

from edge.readers.events import InputsChanged, OutputsChanged, PowerChanged, ReaderIoEvent, TamperChanged

__all__ = ["InputsChanged", "OutputsChanged", "PowerChanged", "ReaderIoEvent", "TamperChanged"]
