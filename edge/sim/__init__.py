"""The simulated gateway: virtual GPIO pins (pins.py), the Wiegand transmitter (transmitter.py), its hands on
the mock pins and the control-socket handlers (hands.py), demo provisioning (demo.py).

Never imported by production code (tests/test_layers.py): edge/cli.py picks it when the hardware profile is
simulated.
"""
