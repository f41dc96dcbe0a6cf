import sys

from .cli import main

if __name__ == "__main__":  # worker processes (spawn / forkserver) may import this module
    sys.exit(main())
