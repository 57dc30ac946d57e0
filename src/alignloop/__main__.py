import sys

from alignloop.cli import main

sys.exit(main())
