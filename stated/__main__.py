import sys

from stated.cli import main

sys.exit(main())
