"""Alembic migrations of the metadata schema (run at start and by `entremise db upgrade`)."""
