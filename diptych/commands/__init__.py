"""One module per `diptych` subcommand; each exposes ``add_arguments(parser)`` and ``run(args) -> int``."""
