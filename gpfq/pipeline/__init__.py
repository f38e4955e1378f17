"""The network procedure: find the layers (`discovery`, seeing each weight's calls with `capture`), draw calibration
images (`streams`), collect each layer's rows or Gram sums (`calibrator`, `rows`, `cached_forward`), run a layer rule
of `gpfq.methods` on them and write the result back, layer by layer (`network`), reporting each layer (`reports`) and
calling the hooks (`hooks`); `coverage` says what stayed float, `distributed` splits the rows across processes,
`checkpoint` resumes an interrupted loop, `folding` folds BatchNorm first, `inputs` handles models whose input is not
one tensor."""
