"""The `btsearch` command line (installed as the package `btsearch.cli`): commands in `main`,
shared options in `options`, printing in `output`."""
