"""Analysis and delivery jobs: the queue and (with the analysis issue) the workers."""
