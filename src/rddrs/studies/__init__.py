"""What the book computes and shows: the study driver (``study``) and the studies of each heavy
chapter in the module of its name (``headline``: chapter 5, ``budget``: 7, ``claims``: 8), their
sizes (``budgets``), the registry of a preset's runs, the fill, the mechanism's measures, the 2D
problem, validity checks and attacks, analysis and display. It imports ``rddrs.core`` and
``rddrs.pipeline``."""
