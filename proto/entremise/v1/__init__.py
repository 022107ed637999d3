"""Generated protobuf and gRPC code of the Entremise v1 API (see the .proto files beside it)."""
