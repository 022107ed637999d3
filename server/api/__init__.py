"""gRPC adapters: thin servicers translating proto <-> domain, and the error catalogue."""
