"""The Entremise hub: domain core, storage, DP engine and gRPC API."""
