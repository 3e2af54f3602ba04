"""`python -m diptych` (and `torchrun -m diptych`) runs the CLI."""

from diptych.cli import main

raise SystemExit(main())
