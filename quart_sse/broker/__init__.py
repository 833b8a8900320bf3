"""Brokers: the in-process one, Redis, Redis Cluster (one interface, quart_sse/broker/base.py)."""
