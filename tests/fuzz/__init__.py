"""Property-based tests of every surface that takes input from outside (issue 15).

``NOPF_FUZZ_EXAMPLES=100000 .venv/bin/pytest tests/fuzz`` runs the nightly size
(that many examples per surface); without it each surface runs its small CI
count. See :mod:`tests.fuzz.budget`.
"""
