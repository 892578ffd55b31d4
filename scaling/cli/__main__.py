"""`python -m vidscale.scaling.cli ...` is `vidscale ...`."""
import sys

from vidscale.scaling.cli.main import main

sys.exit(main())
