"""One module per `xdpoib` subcommand (see `xdpoib.cli`)."""
