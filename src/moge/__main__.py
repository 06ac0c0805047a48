import sys

from moge.cli import main

sys.exit(main())
