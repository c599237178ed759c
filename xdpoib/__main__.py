import sys

from xdpoib.cli import main

sys.exit(main())
