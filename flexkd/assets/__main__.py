import sys

from flexkd.assets.cli import main

sys.exit(main())
