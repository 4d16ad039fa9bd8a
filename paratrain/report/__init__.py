"""Side-by-side comparison of layouts on this machine: `paratrain compare`."""
