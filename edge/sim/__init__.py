"""The simulated gateway: its hands on the mock pins (edge/sim/hands.py), demo provisioning (edge/sim/demo.py).

Never imported by production code: edge/cli.py picks it when the hardware profile is simulated.
"""
