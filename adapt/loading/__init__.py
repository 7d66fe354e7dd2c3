"""Loading a diffusion checkpoint to run it: the weights dtype a device pays off with (`precision`) and the
model itself (`model`)."""
