"""Values derived from the config and the host: thread and in-flight counts."""

from __future__ import annotations

from rmbgd.config.cpus import available_cpus
from rmbgd.config.schema import Config

__all__ = ["effective_max_in_flight", "effective_workers"]



def effective_workers(cfg: Config) -> int:
    """Decode/encode threads: the configured count, or one per usable CPU when it is 0
    (the affinity mask and a cgroup CPU quota count, not just the host's cores)."""
    if cfg.pipeline.workers > 0:
        return cfg.pipeline.workers
    return available_cpus()


def effective_max_in_flight(cfg: Config) -> int:
    """Most files claimed but unfinished; 0 means enough for two batches plus one per worker."""
    if cfg.pipeline.max_in_flight > 0:
        return cfg.pipeline.max_in_flight
    return 2 * cfg.batch.size + effective_workers(cfg)
