"""``python -m sharedllm_ops``: the same command as ``sharedllm-ops``."""

from .cli import main

raise SystemExit(main())
