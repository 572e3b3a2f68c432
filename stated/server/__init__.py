"""The wire: the gRPC servicer, the step channel and the daemon that serves both on unix sockets.

Thin servicers (STYLE.md): decode, validate, call the core (stated.store), encode. What both ends agree
on lives on the client's side (stated_client.protocol); how a core error becomes a status, for both
wires, is stated.server.status_codes.
"""
