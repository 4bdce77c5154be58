"""The exception root of cloud_bridge: every error this package raises on purpose derives from
`CloudBridgeError`, so a caller (the CLI, the operator service, the gateway's link) can tell cloud_bridge's
refusals from bugs with one `except`.

`CloudBridgeError` is itself an `edge.errors.EdgeError`: the gateway agent and both command-line tools catch
`EdgeError` at the top, and a cloud_bridge error reaching them (a malformed message, a refused command, a
full staging area) is reported the same way. Pure: no I/O.

The errors themselves live with the code that raises them (`protocol.ProtocolError`, `signing.CommandRejected`,
`cloud.CloudError`, `operator.db.OperatorError` and `operator.provision.ProvisionError`,
`link.staging.StagingFull`, `permissions.PermissionsInvalid` and `PermissionDenied`).
"""

from __future__ import annotations

from edge.errors import EdgeError


class CloudBridgeError(EdgeError):
    """Root of every error cloud_bridge raises on purpose."""
