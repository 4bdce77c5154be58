"""The operator side of cloud_bridge: the cloud's site model, provisioning, visitors, event collection.

See docs/operator.md. `Service` is the library facade (every call checked against operator permissions).
"""
