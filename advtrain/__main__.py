"""``python -m advtrain``."""

from advtrain.cli import main

if __name__ == "__main__":
    main()
