"""Jobs, the dynamic-batching collector, and the pipeline that drives each file through the stages."""
