"""Loopback fixture servers that imitate Google services (GCE metadata server, Pub/Sub REST)."""
