import sys

from scaling.sweep.schedule import main

sys.exit(main())
