"""Benchmarks and stress runs that print JSON (see the Makefile)."""
