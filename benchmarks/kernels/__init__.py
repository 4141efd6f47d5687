"""The decoding kernels (attention, gated MLP, decode-shaped GEMMs) against torch and cuBLAS, on a GPU."""
