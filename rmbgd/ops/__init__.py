"""Operating it: JSON logs, systemd notify and watchdog, metrics, the status file."""
