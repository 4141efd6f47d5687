"""Whether a path computes what the model computes: the architecture matrix, exported models against hooks."""
