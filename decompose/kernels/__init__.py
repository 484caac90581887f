"""Pure tensor maths of every factorization: weights in, factors and errors out (no modules).

One file per family, as in tensorly's ``decomposition`` package: :mod:`.nd` (Network
Decoupling: one SVD per channel, both orders), and the others added beside it. Nothing here
knows about ``nn.Module``; :mod:`decompose.methods` turns factors into layers.
"""
