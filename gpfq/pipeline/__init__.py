"""The network procedure: find the layers (`capture`), draw calibration images (`streams`), collect each
layer's rows or Gram sums, run a layer rule of `gpfq.methods` on them and write the result back, layer by layer
(`network`); `distributed` splits the rows across processes, `checkpoint` resumes an interrupted loop,
`folding` folds BatchNorm first, `inputs` handles models whose input is not one tensor."""
