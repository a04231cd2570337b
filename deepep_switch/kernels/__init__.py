"""Device kernels a generation's paths use: the expanded-rows <-> ``[E_local, R*N, H]`` layout conversion."""
