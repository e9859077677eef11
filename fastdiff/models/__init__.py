"""The networks: one readable file each. Parameter names are the diffusers/transformers
checkpoint keys, so loading is a rename table, not a transformation."""
