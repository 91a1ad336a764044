"""``python -m meshmq`` is the ``meshmq`` command."""

from ._cli import main

raise SystemExit(main())
