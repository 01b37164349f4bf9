"""Applications on top of the tools and the core: the demo, the hierarchy explorer (a web page, `explorer/`), the
default-model recipe, benchmarks and the CPU-scale reproduction. Nothing in the package imports them except the
command line."""
