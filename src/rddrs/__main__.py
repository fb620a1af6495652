"""`python -m rddrs` is the `rddrs` console script."""

from rddrs.cli import main

raise SystemExit(main())
