"""``python -m cryoformer_ext.commands``: the ``cryoformer`` command (e.g. under torchrun)."""

import sys

from cryoformer_ext.commands import main

sys.exit(main())
