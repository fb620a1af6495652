"""What the book computes and shows: the registry of a preset's runs, the studies of the paper's
claims and headline, the mechanism, the 2D problem, validity checks and attacks, analysis and
display. It imports ``rddrs.core`` and ``rddrs.pipeline``."""
