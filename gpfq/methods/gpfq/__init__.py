"""GPFQ (Lybrand & Saab 2021; Zhang & Saab 2023): `reference.gpfq_reference` is the per-column rule as the
paper writes it; `engine.gpfq_blocked` computes the same codes blockwise, its in-block step in `inblock`."""
