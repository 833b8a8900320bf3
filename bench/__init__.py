"""Load-generation harness for the SSE service: raw-socket clients, scenarios, and a naive baseline to compare with.

Run `python -m bench --help` from the project root; see bench/README.md.
"""
