"""Reading and writing weights in the diffusers / transformers formats (no torch at run time)."""
