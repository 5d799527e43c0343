"""``python -m biformer`` runs the ``biformer`` command."""

from .cli import main

raise SystemExit(main())
