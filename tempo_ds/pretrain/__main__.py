"""``python -m tempo_ds.pretrain``: see tempo_ds/pretrain/cli.py."""
import sys

from .cli import main

sys.exit(main())
