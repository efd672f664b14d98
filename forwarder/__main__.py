"""`python -m forwarder` runs the natfwd command line."""

from forwarder.cli import main

raise SystemExit(main())
