"""The control socket: varlink, sans-IO codec and interface model plus the anyio server."""
