"""``python -m difract_ext.cli`` (also under ``torchrun`` / ``accelerate launch``)."""

import sys

from difract_ext.cli.main import main

sys.exit(main())
