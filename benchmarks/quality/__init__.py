"""What the methods achieve: weight-edit options and search, kept refusal, learned refusal openings, demos."""
