"""Settings: the YAML schema and loading, per-file output profiles, usable CPU counts."""
