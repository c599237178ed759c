"""`python -m xdpoib.agent SPEC_JSON`: run one attachment's agent in the foreground."""

import sys

from xdpoib.agent.core import main

sys.exit(main())
