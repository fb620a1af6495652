"""Runs on data: datasets, models, training, run settings, resumable runs and their result files,
shards, engines and the sweep, the memory pass as a run, archives that carry rows between
machines, files and provenance. It imports ``rddrs.core``, never ``rddrs.studies``."""
