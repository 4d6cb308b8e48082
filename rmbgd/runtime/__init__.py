"""The two ways rmbgd runs: the daemon (run) and one pass over files (process)."""
