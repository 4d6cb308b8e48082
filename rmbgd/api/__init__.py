"""The optional HTTP API: requests that feed the same batch queue as the inbox."""
