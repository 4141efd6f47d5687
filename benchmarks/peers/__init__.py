"""Other tools on the same model and prompts: heretic (see README.md here)."""
