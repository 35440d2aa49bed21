"""Training tasks: how raw samples become model batches (CPM-Bee in `bee`)."""
