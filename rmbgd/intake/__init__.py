"""Finding arrived files: names, the watcher, readiness rules, claiming into the work area."""
