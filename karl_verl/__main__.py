import sys

from karl_verl.cli import main

sys.exit(main())
