import sys

from ucp.cli import main

sys.exit(main())
