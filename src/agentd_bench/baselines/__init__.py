"""Peer servers the gateway benchmark compares agentd against, each run as its own process."""
