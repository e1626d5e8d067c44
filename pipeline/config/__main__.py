"""`python -m pipeline.config [params.yaml]`: validate a params file, print a one-line summary (exit 2 on problems)."""

from pipeline.config.params import main

raise SystemExit(main())
