"""Conversion toolkit for m2-hf: dense <-> Monarch checkpoint conversion.

The command-line interface (`m2-convert`) is built on `m2_hf.monarch` (`MonarchLinear.from_linear`,
`BlockdiagLinear.from_linear`, `projection_error`, `to_linear`); see the project README for what is available.
"""
