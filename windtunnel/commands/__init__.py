"""One module per `windtunnel` subcommand (see windtunnel/cli.py)."""
