"""Benchmarks and stress runs that print JSON (see the Makefile).

Every run starts fresh hubs on port 0. Clients keep the audit heads they witnessed per hub
address, and a later hub on a reused port is another hub, not the same one with a changed
key: so a run's clients witness into a throwaway directory, never `~/.entremise/witness`.
"""

import os
import tempfile

os.environ.setdefault("ENTREMISE_WITNESS_DIR", tempfile.mkdtemp(prefix="entremise-bench-witness-"))
