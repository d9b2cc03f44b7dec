"""`python -m pdserve.entrypoints.openai.api_server`: FastDeploy's module path for a node."""

from __future__ import annotations

import sys

from pdserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
