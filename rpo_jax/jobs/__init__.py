"""Jobs: what a command runs, start to end. Resolves ``tiny:`` / ``toy:`` / folder specs, builds
the mesh and loads each model once, then hands them down to the layers below."""
