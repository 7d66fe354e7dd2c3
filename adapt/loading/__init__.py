"""Loading a diffusion checkpoint to run it: the weights dtype a device pays off with (`precision`), the
model itself (`model`), and what its weights must be to be used or published: every tensor there, all
finite (`weights`)."""
