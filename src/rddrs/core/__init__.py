"""The certification core: geometry of SPD matrices, smoothing families and noise streams,
statistics, objectives, step rules, the one per-input search, PREDICT / CERTIFY, the methods
and presets, and the region geometry of the memory pass. It knows no files and no dataset;
it imports nothing from ``rddrs.pipeline`` or ``rddrs.studies``."""
