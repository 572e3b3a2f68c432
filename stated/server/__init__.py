"""The wire: the gRPC servicer, the step channel and the daemon that serves both on unix sockets.

Thin servicers (STYLE.md): decode, validate, call the core (stated.store), encode.
"""
