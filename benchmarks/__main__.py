"""``python -m benchmarks …``: the same as ``convcore bench …``."""

from .cli import main

raise SystemExit(main())
