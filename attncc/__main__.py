"""`python -m attncc`: the same as the `attncc` command."""
from .cli import main

raise SystemExit(main())
