"""Alembic migrations of the hub's metadata schema (applied at start and by `entremise db upgrade`)."""
