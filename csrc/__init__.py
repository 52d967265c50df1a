"""C++ (CPU) and CUDA sources, shipped as package data and compiled on first use by fastcomp._build."""
