"""One module per CLI subcommand; each defines HELP, configure(parser) and run(args) -> int."""
