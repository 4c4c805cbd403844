"""Running the core on a mesh: loading, the `Model`, batching, placement and the batch loop."""
