"""l2a_kernels: query-sparse global attention and sliding-window attention (leaf package)."""
