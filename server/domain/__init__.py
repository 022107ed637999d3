"""Domain core of the hub. Imports neither grpc nor SQLAlchemy."""
