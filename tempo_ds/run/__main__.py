"""``python -m tempo_ds.run [tempo options] SCRIPT [script arguments]`` (see tempo_ds.run)."""
import sys

from tempo_ds.run import main

sys.exit(main())
