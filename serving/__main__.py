import sys

from serving.cli.main import main

sys.exit(main())
