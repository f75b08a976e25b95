"""Applications built on the engine and the pipelines: the CLI, the demo, evaluation, benchmarks and
training. They import the layers below them and each other's public names only."""
