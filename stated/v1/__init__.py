"""Generated gRPC code for the stated.v1 wire contract (make protos). Do not edit."""
