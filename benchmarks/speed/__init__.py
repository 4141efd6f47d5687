"""How fast the pipeline's stages run: stage timings against naive baselines, decode-step and selection profiles."""
