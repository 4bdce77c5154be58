"""The simulated gateway: virtual GPIO pins, the Wiegand transmitter, the control-socket hands, the demo.

Never imported by production code (tests/test_layers.py); the CLI picks it by name at run time.
"""
